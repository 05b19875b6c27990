"""The front end: a network namespace with a TAP, carried by a pyslirp backend."""
