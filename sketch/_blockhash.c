/*
 * Batch MD5 of fixed-size blocks, with all-zero blocks detected and skipped.
 *
 * Python's hashlib costs ~1 us of call overhead per 512-byte block and keeps the GIL for inputs
 * under 2 KiB, so per-block hashing from Python runs at ~0.55x `openssl speed`. This loop hashes
 * a whole chunk of blocks in C with the GIL released, so threads use every core, and hashes the
 * non-zero blocks 16 or 32 at a time in SIMD lanes where the CPU has AVX2 or AVX-512 (see the
 * module docstring for IMPLEMENTATION and BLOCKSKETCH_MD5).
 * The MD5 compression function follows RFC 1321 (the public-domain formulation by A. Peslyak).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ---- Multi-buffer MD5: one block per 32-bit SIMD lane. ----
 * Every block is its own message of the same length, so 8 (AVX2) or 16 (AVX-512) blocks run the
 * 64 steps in lockstep, one lane each. The functions carry target attributes instead of a global
 * -mavx2, so the module still builds and runs anywhere; init picks the best the CPU supports. */

/* The 64 steps of RFC 1321 once, for every vector width: S(f, a, b, c, d, word, constant, shift). */
#define MD5_64_STEPS(S, F_, G_, H_, I_, X)                                                        \
    S(F_, a, b, c, d, X(0), 0xd76aa478, 7)   S(F_, d, a, b, c, X(1), 0xe8c7b756, 12)            \
    S(F_, c, d, a, b, X(2), 0x242070db, 17)  S(F_, b, c, d, a, X(3), 0xc1bdceee, 22)            \
    S(F_, a, b, c, d, X(4), 0xf57c0faf, 7)   S(F_, d, a, b, c, X(5), 0x4787c62a, 12)            \
    S(F_, c, d, a, b, X(6), 0xa8304613, 17)  S(F_, b, c, d, a, X(7), 0xfd469501, 22)            \
    S(F_, a, b, c, d, X(8), 0x698098d8, 7)   S(F_, d, a, b, c, X(9), 0x8b44f7af, 12)            \
    S(F_, c, d, a, b, X(10), 0xffff5bb1, 17) S(F_, b, c, d, a, X(11), 0x895cd7be, 22)           \
    S(F_, a, b, c, d, X(12), 0x6b901122, 7)  S(F_, d, a, b, c, X(13), 0xfd987193, 12)           \
    S(F_, c, d, a, b, X(14), 0xa679438e, 17) S(F_, b, c, d, a, X(15), 0x49b40821, 22)           \
    S(G_, a, b, c, d, X(1), 0xf61e2562, 5)   S(G_, d, a, b, c, X(6), 0xc040b340, 9)             \
    S(G_, c, d, a, b, X(11), 0x265e5a51, 14) S(G_, b, c, d, a, X(0), 0xe9b6c7aa, 20)            \
    S(G_, a, b, c, d, X(5), 0xd62f105d, 5)   S(G_, d, a, b, c, X(10), 0x02441453, 9)            \
    S(G_, c, d, a, b, X(15), 0xd8a1e681, 14) S(G_, b, c, d, a, X(4), 0xe7d3fbc8, 20)            \
    S(G_, a, b, c, d, X(9), 0x21e1cde6, 5)   S(G_, d, a, b, c, X(14), 0xc33707d6, 9)            \
    S(G_, c, d, a, b, X(3), 0xf4d50d87, 14)  S(G_, b, c, d, a, X(8), 0x455a14ed, 20)            \
    S(G_, a, b, c, d, X(13), 0xa9e3e905, 5)  S(G_, d, a, b, c, X(2), 0xfcefa3f8, 9)             \
    S(G_, c, d, a, b, X(7), 0x676f02d9, 14)  S(G_, b, c, d, a, X(12), 0x8d2a4c8a, 20)           \
    S(H_, a, b, c, d, X(5), 0xfffa3942, 4)   S(H_, d, a, b, c, X(8), 0x8771f681, 11)            \
    S(H_, c, d, a, b, X(11), 0x6d9d6122, 16) S(H_, b, c, d, a, X(14), 0xfde5380c, 23)           \
    S(H_, a, b, c, d, X(1), 0xa4beea44, 4)   S(H_, d, a, b, c, X(4), 0x4bdecfa9, 11)            \
    S(H_, c, d, a, b, X(7), 0xf6bb4b60, 16)  S(H_, b, c, d, a, X(10), 0xbebfbc70, 23)           \
    S(H_, a, b, c, d, X(13), 0x289b7ec6, 4)  S(H_, d, a, b, c, X(0), 0xeaa127fa, 11)            \
    S(H_, c, d, a, b, X(3), 0xd4ef3085, 16)  S(H_, b, c, d, a, X(6), 0x04881d05, 23)            \
    S(H_, a, b, c, d, X(9), 0xd9d4d039, 4)   S(H_, d, a, b, c, X(12), 0xe6db99e5, 11)           \
    S(H_, c, d, a, b, X(15), 0x1fa27cf8, 16) S(H_, b, c, d, a, X(2), 0xc4ac5665, 23)            \
    S(I_, a, b, c, d, X(0), 0xf4292244, 6)   S(I_, d, a, b, c, X(7), 0x432aff97, 10)            \
    S(I_, c, d, a, b, X(14), 0xab9423a7, 15) S(I_, b, c, d, a, X(5), 0xfc93a039, 21)            \
    S(I_, a, b, c, d, X(12), 0x655b59c3, 6)  S(I_, d, a, b, c, X(3), 0x8f0ccc92, 10)            \
    S(I_, c, d, a, b, X(10), 0xffeff47d, 15) S(I_, b, c, d, a, X(1), 0x85845dd1, 21)            \
    S(I_, a, b, c, d, X(8), 0x6fa87e4f, 6)   S(I_, d, a, b, c, X(15), 0xfe2ce6e0, 10)           \
    S(I_, c, d, a, b, X(6), 0xa3014314, 15)  S(I_, b, c, d, a, X(13), 0x4e0811a1, 21)           \
    S(I_, a, b, c, d, X(4), 0xf7537e82, 6)   S(I_, d, a, b, c, X(11), 0xbd3af235, 10)           \
    S(I_, c, d, a, b, X(2), 0x2ad7d2bb, 15)  S(I_, b, c, d, a, X(9), 0xeb86d391, 21)

/* Hashes `lanes` blocks of `length` bytes each (a multiple of 64) into 16-byte digests. */
typedef void (*lanes_fn)(const unsigned char *const *blocks, size_t length, unsigned char *const *outs);

static void lanes2_scalar(const unsigned char *const *blocks, size_t length, unsigned char *const *outs) {
    md5_block_pair(blocks[0], blocks[1], length, outs[0], outs[1]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_SIMD 1
#include <immintrin.h>

/* Each kernel below hashes one or two groups of lanes: MD5 steps form one dependency chain, so a
 * second, independent group in the same instruction stream keeps the vector units busy while the
 * first waits (measured on EPYC at 512-byte blocks: AVX2 2.7-3.3 -> 4.9 GB/s, AVX-512 6.0 -> 8.1).
 * `groups` is a constant after inlining, so the one-group variants carry no second-group code.
 * The message words are loaded by whole rows and transposed in registers: gather instructions
 * measured about half as fast (AVX2 1.7, AVX-512 3.2 GB/s with one group). */

#define STEP_IN_GROUPS(STEP, f, a, b, c, d, i, t, s)                                                \
    STEP(f, a, b, c, d, w[i], t, s)                                                                 \
    if (groups == 2) { STEP(f, a##2, b##2, c##2, d##2, w2[i], t, s) }
#define WORD_INDEX(i) i

/* Operand order keeps b (the word the previous step produced) late in each chain, so the
 * parts that do not depend on it start early. */
#define V8_F(x, y, z) _mm256_xor_si256(z, _mm256_and_si256(x, _mm256_xor_si256(y, z)))
#define V8_G(x, y, z) _mm256_or_si256(_mm256_and_si256(x, z), _mm256_andnot_si256(z, y))
#define V8_H(x, y, z) _mm256_xor_si256(x, _mm256_xor_si256(y, z))
#define V8_I(x, y, z) _mm256_xor_si256(y, _mm256_or_si256(x, _mm256_xor_si256(z, ones)))
#define V8_STEP(f, a, b, c, d, x, t, s)                                                            \
    a = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_add_epi32(x, _mm256_set1_epi32((int)(t)))),   \
                         f(b, c, d));                                                              \
    a = _mm256_add_epi32(_mm256_or_si256(_mm256_slli_epi32(a, s), _mm256_srli_epi32(a, 32 - (s))), b);
#define V8_STEP2(f, a, b, c, d, i, t, s) STEP_IN_GROUPS(V8_STEP, f, a, b, c, d, i, t, s)

/* Words j..j+7 of 8 rows become 8 vectors, vector k holding word j+k of every row. */
__attribute__((target("avx2"))) static inline void transpose8(const unsigned char *const *rows, size_t offset,
                                                               __m256i *w) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(rows[i] + offset));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        w[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
        w[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
    }
}

/* The 64-byte chunk at `offset` of 8 rows as 16 vectors of words; past the end, the padding
 * chunk, the same for every lane: 0x80, zeros, the length in bits. */
__attribute__((target("avx2"))) static inline void load_words8(const unsigned char *const *rows, size_t offset,
                                                                size_t length, __m256i *w) {
    if (offset < length) {
        transpose8(rows, offset, w);
        transpose8(rows, offset + 32, w + 8);
        return;
    }
    uint64_t bits = (uint64_t)length * 8;
    for (int i = 1; i < 14; i++) w[i] = _mm256_setzero_si256();
    w[0] = _mm256_set1_epi32(0x80);
    w[14] = _mm256_set1_epi32((int)(uint32_t)bits);
    w[15] = _mm256_set1_epi32((int)(uint32_t)(bits >> 32));
}

__attribute__((target("avx2"), always_inline)) static inline void md5_avx2(const unsigned char *const *blocks,
                                                                            size_t length,
                                                                            unsigned char *const *outs, int groups) {
    const __m256i ones = _mm256_set1_epi32(-1);
    __m256i a = _mm256_set1_epi32(0x67452301), b = _mm256_set1_epi32((int)0xefcdab89);
    __m256i c = _mm256_set1_epi32((int)0x98badcfe), d = _mm256_set1_epi32(0x10325476);
    __m256i a2 = a, b2 = b, c2 = c, d2 = d;
    __m256i w[16], w2[16];
    for (size_t offset = 0; offset <= length; offset += 64) {
        load_words8(blocks, offset, length, w);
        if (groups == 2) load_words8(blocks + 8, offset, length, w2);
        __m256i sa = a, sb = b, sc = c, sd = d, sa2 = a2, sb2 = b2, sc2 = c2, sd2 = d2;
        MD5_64_STEPS(V8_STEP2, V8_F, V8_G, V8_H, V8_I, WORD_INDEX)
        a = _mm256_add_epi32(a, sa); b = _mm256_add_epi32(b, sb);
        c = _mm256_add_epi32(c, sc); d = _mm256_add_epi32(d, sd);
        if (groups == 2) {
            a2 = _mm256_add_epi32(a2, sa2); b2 = _mm256_add_epi32(b2, sb2);
            c2 = _mm256_add_epi32(c2, sc2); d2 = _mm256_add_epi32(d2, sd2);
        }
    }
    uint32_t state[8][8];
    _mm256_storeu_si256((__m256i *)state[0], a); _mm256_storeu_si256((__m256i *)state[1], b);
    _mm256_storeu_si256((__m256i *)state[2], c); _mm256_storeu_si256((__m256i *)state[3], d);
    _mm256_storeu_si256((__m256i *)state[4], a2); _mm256_storeu_si256((__m256i *)state[5], b2);
    _mm256_storeu_si256((__m256i *)state[6], c2); _mm256_storeu_si256((__m256i *)state[7], d2);
    for (int lane = 0; lane < 8 * groups; lane++) {
        int g = lane / 8 * 4, l = lane % 8;
        uint32_t digest[4] = {state[g][l], state[g + 1][l], state[g + 2][l], state[g + 3][l]};
        memcpy(outs[lane], digest, 16);
    }
}

__attribute__((target("avx2"))) static void md5_lanes8_avx2(const unsigned char *const *blocks, size_t length,
                                                             unsigned char *const *outs) {
    md5_avx2(blocks, length, outs, 1);
}

__attribute__((target("avx2"))) static void md5_lanes16_avx2(const unsigned char *const *blocks, size_t length,
                                                              unsigned char *const *outs) {
    md5_avx2(blocks, length, outs, 2);
}

/* AVX-512: one ternary-logic instruction per round function and a native rotate. */
#define V16_F(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0xca) /* x ? y : z */
#define V16_G(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0xe4) /* z ? x : y */
#define V16_H(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0x96) /* x ^ y ^ z */
#define V16_I(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0x39) /* y ^ (x | ~z) */
#define V16_STEP(f, a, b, c, d, x, t, s)                                                           \
    a = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_add_epi32(x, _mm512_set1_epi32((int)(t)))),   \
                         f(b, c, d));                                                              \
    a = _mm512_add_epi32(_mm512_rol_epi32(a, s), b);
#define V16_STEP2(f, a, b, c, d, i, t, s) STEP_IN_GROUPS(V16_STEP, f, a, b, c, d, i, t, s)

/* The 64-byte chunk at `offset` of 16 rows as 16 vectors, vector k holding word k of every row;
 * past the end, the padding chunk. */
__attribute__((target("avx512f"))) static inline void load_words16(const unsigned char *const *rows, size_t offset,
                                                                    size_t length, __m512i *w) {
    if (offset >= length) {
        uint64_t bits = (uint64_t)length * 8;
        for (int i = 1; i < 14; i++) w[i] = _mm512_setzero_si512();
        w[0] = _mm512_set1_epi32(0x80);
        w[14] = _mm512_set1_epi32((int)(uint32_t)bits);
        w[15] = _mm512_set1_epi32((int)(uint32_t)(bits >> 32));
        return;
    }
    __m512i r[16], t[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(rows[i] + offset));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[4m + k]: quarter q holds word 4q + k of rows 4m..4m+3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) { /* a 4x4 transpose of 128-bit quarters */
        __m512i v0 = _mm512_shuffle_i32x4(u[k], u[k + 4], 0x44), v1 = _mm512_shuffle_i32x4(u[k], u[k + 4], 0xee);
        __m512i v2 = _mm512_shuffle_i32x4(u[k + 8], u[k + 12], 0x44);
        __m512i v3 = _mm512_shuffle_i32x4(u[k + 8], u[k + 12], 0xee);
        w[k] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        w[k + 4] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        w[k + 8] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        w[k + 12] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
}

__attribute__((target("avx512f"), always_inline)) static inline void md5_avx512(const unsigned char *const *blocks,
                                                                                 size_t length,
                                                                                 unsigned char *const *outs,
                                                                                 int groups) {
    __m512i a = _mm512_set1_epi32(0x67452301), b = _mm512_set1_epi32((int)0xefcdab89);
    __m512i c = _mm512_set1_epi32((int)0x98badcfe), d = _mm512_set1_epi32(0x10325476);
    __m512i a2 = a, b2 = b, c2 = c, d2 = d;
    __m512i w[16], w2[16];
    for (size_t offset = 0; offset <= length; offset += 64) {
        load_words16(blocks, offset, length, w);
        if (groups == 2) load_words16(blocks + 16, offset, length, w2);
        __m512i sa = a, sb = b, sc = c, sd = d, sa2 = a2, sb2 = b2, sc2 = c2, sd2 = d2;
        MD5_64_STEPS(V16_STEP2, V16_F, V16_G, V16_H, V16_I, WORD_INDEX)
        a = _mm512_add_epi32(a, sa); b = _mm512_add_epi32(b, sb);
        c = _mm512_add_epi32(c, sc); d = _mm512_add_epi32(d, sd);
        if (groups == 2) {
            a2 = _mm512_add_epi32(a2, sa2); b2 = _mm512_add_epi32(b2, sb2);
            c2 = _mm512_add_epi32(c2, sc2); d2 = _mm512_add_epi32(d2, sd2);
        }
    }
    uint32_t state[8][16];
    _mm512_storeu_si512(state[0], a); _mm512_storeu_si512(state[1], b);
    _mm512_storeu_si512(state[2], c); _mm512_storeu_si512(state[3], d);
    _mm512_storeu_si512(state[4], a2); _mm512_storeu_si512(state[5], b2);
    _mm512_storeu_si512(state[6], c2); _mm512_storeu_si512(state[7], d2);
    for (int lane = 0; lane < 16 * groups; lane++) {
        int g = lane / 16 * 4, l = lane % 16;
        uint32_t digest[4] = {state[g][l], state[g + 1][l], state[g + 2][l], state[g + 3][l]};
        memcpy(outs[lane], digest, 16);
    }
}

__attribute__((target("avx512f"))) static void md5_lanes16_avx512(const unsigned char *const *blocks,
                                                                   size_t length, unsigned char *const *outs) {
    md5_avx512(blocks, length, outs, 1);
}

__attribute__((target("avx512f"))) static void md5_lanes32_avx512(const unsigned char *const *blocks,
                                                                   size_t length, unsigned char *const *outs) {
    md5_avx512(blocks, length, outs, 2);
}
#endif

/* Kernels from narrowest to widest. An implementation (`level`) runs its widest kernel on full
 * groups and hands a chunk's leftover blocks to narrower kernels of its level or below. */
#define MAX_LANES 32
static const struct {
    int level; /* 0 scalar2, 1 avx2, 2 avx512 */
    int lanes;
    lanes_fn hash;
} kernels[] = {
    {0, 2, lanes2_scalar},
#ifdef HAVE_X86_SIMD
    {1, 8, md5_lanes8_avx2},
    {1, 16, md5_lanes16_avx2},
    {2, 16, md5_lanes16_avx512},
    {2, 32, md5_lanes32_avx512},
#endif
};
#define KERNEL_COUNT ((int)(sizeof(kernels) / sizeof(kernels[0])))
static const char *const level_names[] = {"scalar2", "avx2", "avx512"};

static int available_level = 0; /* the best this CPU runs */
static int active_level = 0;    /* the one md5_blocks uses: available_level unless BLOCKSKETCH_MD5 lowers it */

/* The widest kernel of `level`: the one md5_blocks fills groups for. */
static int widest_kernel(int level) {
    int k = 0;
    while (k + 1 < KERNEL_COUNT && kernels[k + 1].level <= level) k++;
    return k;
}

/* Hashes `count` blocks with the widest kernels at or below `level` that they fill, the last
 * odd block alone. */
static void hash_group(int level, const unsigned char *const *blocks, size_t length, unsigned char *const *outs,
                       int count) {
    int done = 0;
    for (int k = widest_kernel(level); k >= 0; k--)
        while (count - done >= kernels[k].lanes) {
            kernels[k].hash(blocks + done, length, outs + done);
            done += kernels[k].lanes;
        }
    if (done < count) md5_block(blocks[done], length, outs[done]);
}

/* The level of an implementation's name, capped at what this machine runs; -1 if unknown. */
static int level_named(const char *name) {
    for (int l = 0; l < 3; l++)
        if (strcmp(name, level_names[l]) == 0) return l < available_level ? l : available_level;
    return -1;
}

PyDoc_STRVAR(md5_blocks_doc,
"md5_blocks(data, block_size, digests, zero, implementation=None, /) -> int\n\n"
"Hash every block of `data` (a multiple of block_size bytes; block_size a multiple of 64).\n"
"Writes 16 bytes per block into `digests` (untouched for all-zero blocks) and 1/0 per block\n"
"into `zero`. Returns the number of non-zero blocks. Releases the GIL.\n"
"`implementation` (one of AVAILABLE) overrides IMPLEMENTATION for this call, for tests.");

static PyObject *md5_blocks(PyObject *self, PyObject *args) {
    Py_buffer data, digests, zero;
    Py_ssize_t block_size;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "y*nw*w*|z", &data, &block_size, &digests, &zero, &name)) return NULL;
    PyObject *result = NULL;
    int level = active_level;
    if (name != NULL) {
        level = level_named(name);
        if (level < 0 || strcmp(name, level_names[level]) != 0) {
            PyErr_Format(PyExc_ValueError, "implementation %s is not available here", name);
            goto done;
        }
    }
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
    /* Non-zero blocks wait here until they fill every lane of the chosen implementation. */
    const unsigned char *group[MAX_LANES];
    unsigned char *outs[MAX_LANES];
    int widest = widest_kernel(level), lanes = kernels[widest].lanes, pending = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *block = in + i * block_size;
        if (is_zero(block, (size_t)block_size)) {
            flags[i] = 1;
            continue;
        }
        flags[i] = 0;
        nonzero++;
        group[pending] = block;
        outs[pending] = out + i * 16;
        if (++pending == lanes) {
            kernels[widest].hash(group, (size_t)block_size, outs);
            pending = 0;
        }
    }
    hash_group(level, group, (size_t)block_size, outs, pending);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(nonzero);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&digests);
    PyBuffer_Release(&zero);
    return result;
}

/* ---- sorting digest keys ------------------------------------------------------------------
 *
 * sort_keys(keys, order): order[] receives the stable order that sorts the (n, 2) native uint64
 * keys lexicographically, as numpy's lexsort would. MD5 digests are uniform, so a counting pass
 * on the top 16 bits spreads them over 65,536 buckets of ~n/65,536 keys, each then sorted by
 * (key, original index): insertion sort for the small ones, qsort_r for the rare large ones
 * (many copies of one block), so a tie-heavy input costs n log n, never n^2.
 */

#define SORT_BUCKET_BITS 16
#define SORT_SMALL 48

typedef struct {
    uint64_t high, low;
    int64_t row;
} sort_entry;

static int compare_entries(const void *a, const void *b) {
    const sort_entry *x = a, *y = b;
    if (x->high != y->high) return x->high < y->high ? -1 : 1;
    if (x->low != y->low) return x->low < y->low ? -1 : 1;
    return x->row < y->row ? -1 : (x->row > y->row);
}

static void sort_bucket(sort_entry *entries, Py_ssize_t count) {
    if (count > SORT_SMALL) {
        qsort(entries, (size_t)count, sizeof(sort_entry), compare_entries);
        return;
    }
    for (Py_ssize_t a = 1; a < count; a++) {
        sort_entry entry = entries[a];
        Py_ssize_t b = a;
        while (b > 0 && compare_entries(&entries[b - 1], &entry) > 0) {
            entries[b] = entries[b - 1];
            b--;
        }
        entries[b] = entry;
    }
}

PyDoc_STRVAR(sort_keys_doc,
"sort_keys(keys, order, sorted_keys=None)\n--\n\n"
"Write into ORDER (n int64) the stable order sorting KEYS (n x 2 native uint64, C order)\n"
"lexicographically, and KEYS in that order into SORTED_KEYS if given; the GIL is released.\n"
"Needs 24 bytes a key of scratch memory.");

static PyObject *sort_keys(PyObject *self, PyObject *args) {
    Py_buffer keys, order, sorted = {0};
    if (!PyArg_ParseTuple(args, "y*w*|w*", &keys, &order, &sorted)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys.len / 16;
    if (keys.len % 16 || order.len != n * (Py_ssize_t)sizeof(int64_t) ||
            (sorted.buf != NULL && sorted.len != keys.len)) {
        PyErr_SetString(PyExc_ValueError, "keys must be n x 16 bytes, order n int64, sorted_keys n x 16 bytes");
        goto done;
    }
    Py_ssize_t *start = PyMem_RawCalloc((1 << SORT_BUCKET_BITS) + 1, sizeof(Py_ssize_t));
    sort_entry *entries = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(sort_entry));
    if (start == NULL || entries == NULL) {
        PyMem_RawFree(start);
        PyMem_RawFree(entries);
        PyErr_NoMemory();
        goto done;
    }
    const uint64_t *k = keys.buf;
    int64_t *rows = order.buf;
    Py_BEGIN_ALLOW_THREADS
    int shift = 64 - SORT_BUCKET_BITS;
    for (Py_ssize_t i = 0; i < n; i++) start[(k[2 * i] >> shift) + 1]++;
    for (Py_ssize_t b = 0; b < (1 << SORT_BUCKET_BITS); b++) start[b + 1] += start[b];
    /* Scatter in index order, keys beside their row so a bucket sorts in cache. start[b]
     * advances to the next bucket's start: afterwards bucket b spans [start[b - 1], start[b]). */
    for (Py_ssize_t i = 0; i < n; i++) {
        sort_entry *slot = &entries[start[k[2 * i] >> shift]++];
        slot->high = k[2 * i];
        slot->low = k[2 * i + 1];
        slot->row = i;
    }
    Py_ssize_t begin = 0;
    for (Py_ssize_t b = 0; b < (1 << SORT_BUCKET_BITS); b++) {
        sort_bucket(entries + begin, start[b] - begin);
        begin = start[b];
    }
    for (Py_ssize_t i = 0; i < n; i++) rows[i] = entries[i].row;
    if (sorted.buf != NULL) {
        uint64_t *out = sorted.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            out[2 * i] = entries[i].high;
            out[2 * i + 1] = entries[i].low;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(start);
    PyMem_RawFree(entries);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&order);
    if (sorted.buf != NULL) PyBuffer_Release(&sorted);
    return result;
}

static PyMethodDef methods[] = {
    {"md5_blocks", md5_blocks, METH_VARARGS, md5_blocks_doc},
    {"sort_keys", sort_keys, METH_VARARGS, sort_keys_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc,
"Batch MD5 of fixed-size blocks with the GIL released.\n\n"
"Non-zero blocks are hashed several at once, one per SIMD lane. IMPLEMENTATION names the code\n"
"in use: 'avx512' (16 lanes), 'avx2' (8 lanes) or 'scalar2' (two interleaved scalar chains),\n"
"the best this CPU supports unless the environment variable BLOCKSKETCH_MD5 names a lower one\n"
"when the module is imported (a higher one is capped at the best available). AVAILABLE lists\n"
"the implementations this machine runs, slowest first. All give the same digests.");

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockhash", module_doc, -1, methods};

PyMODINIT_FUNC PyInit__blockhash(void) {
    uint32_t probe = 1;
    if (*(unsigned char *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_blockhash assumes a little-endian machine");
        return NULL;
    }
#ifdef HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) available_level = 1;
    if (__builtin_cpu_supports("avx512f") && available_level == 1) available_level = 2;
#endif
    active_level = available_level;
    const char *forced = getenv("BLOCKSKETCH_MD5");
    if (forced != NULL && *forced != '\0') {
        active_level = level_named(forced);
        if (active_level < 0) {
            PyErr_Format(PyExc_ValueError, "BLOCKSKETCH_MD5=%s: use scalar2, avx2 or avx512", forced);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *available = PyTuple_New(available_level + 1);
    if (available == NULL) goto error;
    for (int l = 0; l <= available_level; l++) {
        PyObject *name = PyUnicode_FromString(level_names[l]);
        if (name == NULL) {
            Py_DECREF(available);
            goto error;
        }
        PyTuple_SET_ITEM(available, l, name);
    }
    if (PyModule_AddObject(m, "AVAILABLE", available) < 0) {
        Py_DECREF(available);
        goto error;
    }
    if (PyModule_AddStringConstant(m, "IMPLEMENTATION", level_names[active_level]) < 0) goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
