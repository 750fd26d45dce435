"""The ``blocksketch`` command line: thin click commands over the ``sketch`` library."""
