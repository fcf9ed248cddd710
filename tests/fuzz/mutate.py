"""A plain mutation fuzzer for where atheris is not installed: random edits of the seeds (bit
flips, random bytes, cut, repeated or spliced ranges), no coverage feedback."""

from __future__ import annotations

import random


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        edit = rng.randrange(7)
        at = rng.randrange(len(out) + 1)
        if edit == 0 and out:  # flip one bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif edit == 1 and out:  # an interesting byte
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif edit == 2:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif edit == 3 and out:  # delete a range
            del out[at : at + rng.randint(1, 32)]
        elif edit == 4:  # truncate
            del out[at:]
        elif edit == 5 and out:  # repeat a range
            start = rng.randrange(len(out))
            chunk = out[start : start + rng.randint(1, 64)]
            out[at:at] = chunk * rng.randint(1, 4)
        else:  # splice in part of another seed
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            out[at:at] = other[start : start + rng.randint(1, 64)]
    return bytes(out)
