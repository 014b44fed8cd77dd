"""
How messages say things: counts, and the name a mistyped one was meant
to be.
"""


def counted(number, noun):
    """
    ``"1 slot"``, ``"4 slots"``: a count as a message says it.
    """
    return f"{number} {noun}" + ("" if number == 1 else "s")


def edit_distance(a, b):
    """
    The Levenshtein distance between two strings.
    """
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(
                min(
                    previous[j] + 1,
                    current[j - 1] + 1,
                    previous[j - 1] + (x != y),
                )
            )
        previous = current
    return previous[-1]


def nearest(name, candidates, most=2):
    """
    The candidate closest to ``name`` (the first in sorted order among
    equals), if it is at most ``most`` edits away; else ``None``.
    """
    best = None
    for candidate in sorted(candidates):
        distance = edit_distance(name, candidate)
        if distance <= most and (best is None or distance < best[0]):
            best = (distance, candidate)
    return None if best is None else best[1]
