/*
 * Batch MD5 of fixed-size blocks, with all-zero blocks detected and skipped.
 *
 * Python's hashlib costs ~1 us of call overhead per 512-byte block and keeps the GIL for inputs
 * under 2 KiB, so per-block hashing from Python runs at ~0.55x `openssl speed`. This loop hashes
 * a whole chunk of blocks in C with the GIL released, so threads use every core.
 * The MD5 compression function follows RFC 1321 (the public-domain formulation by A. Peslyak).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define H(x, y, z) ((x) ^ (y) ^ (z))
#define I(x, y, z) ((y) ^ ((x) | ~(z)))
#define STEP(f, a, b, c, d, x, t, s)                          \
    (a) += f((b), (c), (d)) + (x) + (uint32_t)(t);            \
    (a) = ((a) << (s)) | ((a) >> (32 - (s)));                 \
    (a) += (b);

static inline uint32_t load32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4); /* x86 and arm64 little-endian; see the check in module init */
    return v;
}

static void md5_compress(uint32_t state[4], const unsigned char *block) {
    uint32_t x[16];
    for (int i = 0; i < 16; i++) x[i] = load32(block + 4 * i);
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];

    STEP(F, a, b, c, d, x[0], 0xd76aa478, 7)
    STEP(F, d, a, b, c, x[1], 0xe8c7b756, 12)
    STEP(F, c, d, a, b, x[2], 0x242070db, 17)
    STEP(F, b, c, d, a, x[3], 0xc1bdceee, 22)
    STEP(F, a, b, c, d, x[4], 0xf57c0faf, 7)
    STEP(F, d, a, b, c, x[5], 0x4787c62a, 12)
    STEP(F, c, d, a, b, x[6], 0xa8304613, 17)
    STEP(F, b, c, d, a, x[7], 0xfd469501, 22)
    STEP(F, a, b, c, d, x[8], 0x698098d8, 7)
    STEP(F, d, a, b, c, x[9], 0x8b44f7af, 12)
    STEP(F, c, d, a, b, x[10], 0xffff5bb1, 17)
    STEP(F, b, c, d, a, x[11], 0x895cd7be, 22)
    STEP(F, a, b, c, d, x[12], 0x6b901122, 7)
    STEP(F, d, a, b, c, x[13], 0xfd987193, 12)
    STEP(F, c, d, a, b, x[14], 0xa679438e, 17)
    STEP(F, b, c, d, a, x[15], 0x49b40821, 22)

    STEP(G, a, b, c, d, x[1], 0xf61e2562, 5)
    STEP(G, d, a, b, c, x[6], 0xc040b340, 9)
    STEP(G, c, d, a, b, x[11], 0x265e5a51, 14)
    STEP(G, b, c, d, a, x[0], 0xe9b6c7aa, 20)
    STEP(G, a, b, c, d, x[5], 0xd62f105d, 5)
    STEP(G, d, a, b, c, x[10], 0x02441453, 9)
    STEP(G, c, d, a, b, x[15], 0xd8a1e681, 14)
    STEP(G, b, c, d, a, x[4], 0xe7d3fbc8, 20)
    STEP(G, a, b, c, d, x[9], 0x21e1cde6, 5)
    STEP(G, d, a, b, c, x[14], 0xc33707d6, 9)
    STEP(G, c, d, a, b, x[3], 0xf4d50d87, 14)
    STEP(G, b, c, d, a, x[8], 0x455a14ed, 20)
    STEP(G, a, b, c, d, x[13], 0xa9e3e905, 5)
    STEP(G, d, a, b, c, x[2], 0xfcefa3f8, 9)
    STEP(G, c, d, a, b, x[7], 0x676f02d9, 14)
    STEP(G, b, c, d, a, x[12], 0x8d2a4c8a, 20)

    STEP(H, a, b, c, d, x[5], 0xfffa3942, 4)
    STEP(H, d, a, b, c, x[8], 0x8771f681, 11)
    STEP(H, c, d, a, b, x[11], 0x6d9d6122, 16)
    STEP(H, b, c, d, a, x[14], 0xfde5380c, 23)
    STEP(H, a, b, c, d, x[1], 0xa4beea44, 4)
    STEP(H, d, a, b, c, x[4], 0x4bdecfa9, 11)
    STEP(H, c, d, a, b, x[7], 0xf6bb4b60, 16)
    STEP(H, b, c, d, a, x[10], 0xbebfbc70, 23)
    STEP(H, a, b, c, d, x[13], 0x289b7ec6, 4)
    STEP(H, d, a, b, c, x[0], 0xeaa127fa, 11)
    STEP(H, c, d, a, b, x[3], 0xd4ef3085, 16)
    STEP(H, b, c, d, a, x[6], 0x04881d05, 23)
    STEP(H, a, b, c, d, x[9], 0xd9d4d039, 4)
    STEP(H, d, a, b, c, x[12], 0xe6db99e5, 11)
    STEP(H, c, d, a, b, x[15], 0x1fa27cf8, 16)
    STEP(H, b, c, d, a, x[2], 0xc4ac5665, 23)

    STEP(I, a, b, c, d, x[0], 0xf4292244, 6)
    STEP(I, d, a, b, c, x[7], 0x432aff97, 10)
    STEP(I, c, d, a, b, x[14], 0xab9423a7, 15)
    STEP(I, b, c, d, a, x[5], 0xfc93a039, 21)
    STEP(I, a, b, c, d, x[12], 0x655b59c3, 6)
    STEP(I, d, a, b, c, x[3], 0x8f0ccc92, 10)
    STEP(I, c, d, a, b, x[10], 0xffeff47d, 15)
    STEP(I, b, c, d, a, x[1], 0x85845dd1, 21)
    STEP(I, a, b, c, d, x[8], 0x6fa87e4f, 6)
    STEP(I, d, a, b, c, x[15], 0xfe2ce6e0, 10)
    STEP(I, c, d, a, b, x[6], 0xa3014314, 15)
    STEP(I, b, c, d, a, x[13], 0x4e0811a1, 21)
    STEP(I, a, b, c, d, x[4], 0xf7537e82, 6)
    STEP(I, d, a, b, c, x[11], 0xbd3af235, 10)
    STEP(I, c, d, a, b, x[2], 0x2ad7d2bb, 15)
    STEP(I, b, c, d, a, x[9], 0xeb86d391, 21)

    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
}

/* Two independent blocks at once: MD5 is one long dependency chain, so interleaving two chains
 * lets an out-of-order core run them in parallel (~1.7x the throughput of one chain). */
static void md5_compress2(uint32_t sa[4], const unsigned char *ba, uint32_t sb[4], const unsigned char *bb) {
    uint32_t x[16], y[16];
    for (int i = 0; i < 16; i++) { x[i] = load32(ba + 4 * i); y[i] = load32(bb + 4 * i); }
    uint32_t a = sa[0], b = sa[1], c = sa[2], d = sa[3];
    uint32_t e = sb[0], f_ = sb[1], g = sb[2], h = sb[3];

    STEP(F, a, b, c, d, x[0], 0xd76aa478, 7)
    STEP(F, e, f_, g, h, y[0], 0xd76aa478, 7)
    STEP(F, d, a, b, c, x[1], 0xe8c7b756, 12)
    STEP(F, h, e, f_, g, y[1], 0xe8c7b756, 12)
    STEP(F, c, d, a, b, x[2], 0x242070db, 17)
    STEP(F, g, h, e, f_, y[2], 0x242070db, 17)
    STEP(F, b, c, d, a, x[3], 0xc1bdceee, 22)
    STEP(F, f_, g, h, e, y[3], 0xc1bdceee, 22)
    STEP(F, a, b, c, d, x[4], 0xf57c0faf, 7)
    STEP(F, e, f_, g, h, y[4], 0xf57c0faf, 7)
    STEP(F, d, a, b, c, x[5], 0x4787c62a, 12)
    STEP(F, h, e, f_, g, y[5], 0x4787c62a, 12)
    STEP(F, c, d, a, b, x[6], 0xa8304613, 17)
    STEP(F, g, h, e, f_, y[6], 0xa8304613, 17)
    STEP(F, b, c, d, a, x[7], 0xfd469501, 22)
    STEP(F, f_, g, h, e, y[7], 0xfd469501, 22)
    STEP(F, a, b, c, d, x[8], 0x698098d8, 7)
    STEP(F, e, f_, g, h, y[8], 0x698098d8, 7)
    STEP(F, d, a, b, c, x[9], 0x8b44f7af, 12)
    STEP(F, h, e, f_, g, y[9], 0x8b44f7af, 12)
    STEP(F, c, d, a, b, x[10], 0xffff5bb1, 17)
    STEP(F, g, h, e, f_, y[10], 0xffff5bb1, 17)
    STEP(F, b, c, d, a, x[11], 0x895cd7be, 22)
    STEP(F, f_, g, h, e, y[11], 0x895cd7be, 22)
    STEP(F, a, b, c, d, x[12], 0x6b901122, 7)
    STEP(F, e, f_, g, h, y[12], 0x6b901122, 7)
    STEP(F, d, a, b, c, x[13], 0xfd987193, 12)
    STEP(F, h, e, f_, g, y[13], 0xfd987193, 12)
    STEP(F, c, d, a, b, x[14], 0xa679438e, 17)
    STEP(F, g, h, e, f_, y[14], 0xa679438e, 17)
    STEP(F, b, c, d, a, x[15], 0x49b40821, 22)
    STEP(F, f_, g, h, e, y[15], 0x49b40821, 22)

    STEP(G, a, b, c, d, x[1], 0xf61e2562, 5)
    STEP(G, e, f_, g, h, y[1], 0xf61e2562, 5)
    STEP(G, d, a, b, c, x[6], 0xc040b340, 9)
    STEP(G, h, e, f_, g, y[6], 0xc040b340, 9)
    STEP(G, c, d, a, b, x[11], 0x265e5a51, 14)
    STEP(G, g, h, e, f_, y[11], 0x265e5a51, 14)
    STEP(G, b, c, d, a, x[0], 0xe9b6c7aa, 20)
    STEP(G, f_, g, h, e, y[0], 0xe9b6c7aa, 20)
    STEP(G, a, b, c, d, x[5], 0xd62f105d, 5)
    STEP(G, e, f_, g, h, y[5], 0xd62f105d, 5)
    STEP(G, d, a, b, c, x[10], 0x02441453, 9)
    STEP(G, h, e, f_, g, y[10], 0x02441453, 9)
    STEP(G, c, d, a, b, x[15], 0xd8a1e681, 14)
    STEP(G, g, h, e, f_, y[15], 0xd8a1e681, 14)
    STEP(G, b, c, d, a, x[4], 0xe7d3fbc8, 20)
    STEP(G, f_, g, h, e, y[4], 0xe7d3fbc8, 20)
    STEP(G, a, b, c, d, x[9], 0x21e1cde6, 5)
    STEP(G, e, f_, g, h, y[9], 0x21e1cde6, 5)
    STEP(G, d, a, b, c, x[14], 0xc33707d6, 9)
    STEP(G, h, e, f_, g, y[14], 0xc33707d6, 9)
    STEP(G, c, d, a, b, x[3], 0xf4d50d87, 14)
    STEP(G, g, h, e, f_, y[3], 0xf4d50d87, 14)
    STEP(G, b, c, d, a, x[8], 0x455a14ed, 20)
    STEP(G, f_, g, h, e, y[8], 0x455a14ed, 20)
    STEP(G, a, b, c, d, x[13], 0xa9e3e905, 5)
    STEP(G, e, f_, g, h, y[13], 0xa9e3e905, 5)
    STEP(G, d, a, b, c, x[2], 0xfcefa3f8, 9)
    STEP(G, h, e, f_, g, y[2], 0xfcefa3f8, 9)
    STEP(G, c, d, a, b, x[7], 0x676f02d9, 14)
    STEP(G, g, h, e, f_, y[7], 0x676f02d9, 14)
    STEP(G, b, c, d, a, x[12], 0x8d2a4c8a, 20)
    STEP(G, f_, g, h, e, y[12], 0x8d2a4c8a, 20)

    STEP(H, a, b, c, d, x[5], 0xfffa3942, 4)
    STEP(H, e, f_, g, h, y[5], 0xfffa3942, 4)
    STEP(H, d, a, b, c, x[8], 0x8771f681, 11)
    STEP(H, h, e, f_, g, y[8], 0x8771f681, 11)
    STEP(H, c, d, a, b, x[11], 0x6d9d6122, 16)
    STEP(H, g, h, e, f_, y[11], 0x6d9d6122, 16)
    STEP(H, b, c, d, a, x[14], 0xfde5380c, 23)
    STEP(H, f_, g, h, e, y[14], 0xfde5380c, 23)
    STEP(H, a, b, c, d, x[1], 0xa4beea44, 4)
    STEP(H, e, f_, g, h, y[1], 0xa4beea44, 4)
    STEP(H, d, a, b, c, x[4], 0x4bdecfa9, 11)
    STEP(H, h, e, f_, g, y[4], 0x4bdecfa9, 11)
    STEP(H, c, d, a, b, x[7], 0xf6bb4b60, 16)
    STEP(H, g, h, e, f_, y[7], 0xf6bb4b60, 16)
    STEP(H, b, c, d, a, x[10], 0xbebfbc70, 23)
    STEP(H, f_, g, h, e, y[10], 0xbebfbc70, 23)
    STEP(H, a, b, c, d, x[13], 0x289b7ec6, 4)
    STEP(H, e, f_, g, h, y[13], 0x289b7ec6, 4)
    STEP(H, d, a, b, c, x[0], 0xeaa127fa, 11)
    STEP(H, h, e, f_, g, y[0], 0xeaa127fa, 11)
    STEP(H, c, d, a, b, x[3], 0xd4ef3085, 16)
    STEP(H, g, h, e, f_, y[3], 0xd4ef3085, 16)
    STEP(H, b, c, d, a, x[6], 0x04881d05, 23)
    STEP(H, f_, g, h, e, y[6], 0x04881d05, 23)
    STEP(H, a, b, c, d, x[9], 0xd9d4d039, 4)
    STEP(H, e, f_, g, h, y[9], 0xd9d4d039, 4)
    STEP(H, d, a, b, c, x[12], 0xe6db99e5, 11)
    STEP(H, h, e, f_, g, y[12], 0xe6db99e5, 11)
    STEP(H, c, d, a, b, x[15], 0x1fa27cf8, 16)
    STEP(H, g, h, e, f_, y[15], 0x1fa27cf8, 16)
    STEP(H, b, c, d, a, x[2], 0xc4ac5665, 23)
    STEP(H, f_, g, h, e, y[2], 0xc4ac5665, 23)

    STEP(I, a, b, c, d, x[0], 0xf4292244, 6)
    STEP(I, e, f_, g, h, y[0], 0xf4292244, 6)
    STEP(I, d, a, b, c, x[7], 0x432aff97, 10)
    STEP(I, h, e, f_, g, y[7], 0x432aff97, 10)
    STEP(I, c, d, a, b, x[14], 0xab9423a7, 15)
    STEP(I, g, h, e, f_, y[14], 0xab9423a7, 15)
    STEP(I, b, c, d, a, x[5], 0xfc93a039, 21)
    STEP(I, f_, g, h, e, y[5], 0xfc93a039, 21)
    STEP(I, a, b, c, d, x[12], 0x655b59c3, 6)
    STEP(I, e, f_, g, h, y[12], 0x655b59c3, 6)
    STEP(I, d, a, b, c, x[3], 0x8f0ccc92, 10)
    STEP(I, h, e, f_, g, y[3], 0x8f0ccc92, 10)
    STEP(I, c, d, a, b, x[10], 0xffeff47d, 15)
    STEP(I, g, h, e, f_, y[10], 0xffeff47d, 15)
    STEP(I, b, c, d, a, x[1], 0x85845dd1, 21)
    STEP(I, f_, g, h, e, y[1], 0x85845dd1, 21)
    STEP(I, a, b, c, d, x[8], 0x6fa87e4f, 6)
    STEP(I, e, f_, g, h, y[8], 0x6fa87e4f, 6)
    STEP(I, d, a, b, c, x[15], 0xfe2ce6e0, 10)
    STEP(I, h, e, f_, g, y[15], 0xfe2ce6e0, 10)
    STEP(I, c, d, a, b, x[6], 0xa3014314, 15)
    STEP(I, g, h, e, f_, y[6], 0xa3014314, 15)
    STEP(I, b, c, d, a, x[13], 0x4e0811a1, 21)
    STEP(I, f_, g, h, e, y[13], 0x4e0811a1, 21)
    STEP(I, a, b, c, d, x[4], 0xf7537e82, 6)
    STEP(I, e, f_, g, h, y[4], 0xf7537e82, 6)
    STEP(I, d, a, b, c, x[11], 0xbd3af235, 10)
    STEP(I, h, e, f_, g, y[11], 0xbd3af235, 10)
    STEP(I, c, d, a, b, x[2], 0x2ad7d2bb, 15)
    STEP(I, g, h, e, f_, y[2], 0x2ad7d2bb, 15)
    STEP(I, b, c, d, a, x[9], 0xeb86d391, 21)
    STEP(I, f_, g, h, e, y[9], 0xeb86d391, 21)

    sa[0] += a; sa[1] += b; sa[2] += c; sa[3] += d;
    sb[0] += e; sb[1] += f_; sb[2] += g; sb[3] += h;
}

/* MD5 of one block whose length is a multiple of 64: the padding is exactly one more chunk. */
static void md5_block(const unsigned char *data, size_t length, unsigned char out[16]) {
    uint32_t state[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    for (size_t offset = 0; offset < length; offset += 64) md5_compress(state, data + offset);
    unsigned char pad[64] = {0x80};
    uint64_t bits = (uint64_t)length * 8;
    memcpy(pad + 56, &bits, 8);
    md5_compress(state, pad);
    memcpy(out, state, 16);
}

static void md5_block_pair(const unsigned char *a, const unsigned char *b, size_t length,
                           unsigned char out_a[16], unsigned char out_b[16]) {
    uint32_t sa[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    uint32_t sb[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
    for (size_t offset = 0; offset < length; offset += 64) md5_compress2(sa, a + offset, sb, b + offset);
    unsigned char pad[64] = {0x80};
    uint64_t bits = (uint64_t)length * 8;
    memcpy(pad + 56, &bits, 8);
    md5_compress2(sa, pad, sb, pad);
    memcpy(out_a, sa, 16);
    memcpy(out_b, sb, 16);
}

static int is_zero(const unsigned char *data, size_t length) {
    uint64_t acc = 0;
    for (size_t i = 0; i < length; i += 64) {
        uint64_t w[8];
        memcpy(w, data + i, 64);
        acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
        if (acc) return 0;
    }
    return 1;
}

PyDoc_STRVAR(md5_blocks_doc,
"md5_blocks(data, block_size, digests, zero) -> int\n\n"
"Hash every block of `data` (a multiple of block_size bytes; block_size a multiple of 64).\n"
"Writes 16 bytes per block into `digests` (untouched for all-zero blocks) and 1/0 per block\n"
"into `zero`. Returns the number of non-zero blocks. Releases the GIL.");

static PyObject *md5_blocks(PyObject *self, PyObject *args) {
    Py_buffer data, digests, zero;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "y*nw*w*", &data, &block_size, &digests, &zero)) return NULL;
    PyObject *result = NULL;
    if (block_size <= 0 || block_size % 64 || data.len % block_size) {
        PyErr_SetString(PyExc_ValueError, "data must be whole blocks of a multiple of 64 bytes");
        goto done;
    }
    Py_ssize_t count = data.len / block_size;
    if (digests.len < count * 16 || zero.len < count) {
        PyErr_SetString(PyExc_ValueError, "output buffers too small");
        goto done;
    }
    Py_ssize_t nonzero = 0;
    const unsigned char *in = data.buf;
    unsigned char *out = digests.buf, *flags = zero.buf;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t pending = -1; /* a non-zero block waiting for a partner */
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *block = in + i * block_size;
        if (is_zero(block, (size_t)block_size)) {
            flags[i] = 1;
            continue;
        }
        flags[i] = 0;
        nonzero++;
        if (pending < 0) {
            pending = i;
        } else {
            md5_block_pair(in + pending * block_size, block, (size_t)block_size, out + pending * 16, out + i * 16);
            pending = -1;
        }
    }
    if (pending >= 0) md5_block(in + pending * block_size, (size_t)block_size, out + pending * 16);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(nonzero);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&digests);
    PyBuffer_Release(&zero);
    return result;
}

static PyMethodDef methods[] = {
    {"md5_blocks", md5_blocks, METH_VARARGS, md5_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockhash",
    "Batch MD5 of fixed-size blocks with the GIL released.", -1, methods};

PyMODINIT_FUNC PyInit__blockhash(void) {
    uint32_t probe = 1;
    if (*(unsigned char *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_blockhash assumes a little-endian machine");
        return NULL;
    }
    return PyModule_Create(&module);
}
