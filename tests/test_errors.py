"""The exception tree drawn in ``routemq_outbox.errors`` is the real one."""

from __future__ import annotations

from routemq_outbox import errors


def drawn_tree() -> dict[str, str]:
    """Each class drawn in the docstring -> its parent in the drawing."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (depth, name) of the current branch
    for line in (errors.__doc__ or "").splitlines():
        if "── " in line:
            prefix, rest = line.split("── ", 1)
            depth = len(prefix)
        elif line.strip() == "OutboxError":
            depth, rest = 0, "OutboxError"
        else:
            continue
        name = rest.split()[0]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def test_the_drawn_tree_is_the_class_hierarchy() -> None:
    drawn = drawn_tree()
    real = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and cls is not errors.OutboxError:
            (parent,) = [b for b in cls.__bases__ if issubclass(b, errors.OutboxError)]
            real[name] = parent.__name__
    assert drawn == real


def test_lookup_errors_are_also_lookup_errors() -> None:
    assert issubclass(errors.UnknownQueue, LookupError)
    assert issubclass(errors.UnknownFailedJob, LookupError)
    assert str(errors.UnknownQueue()) == "No job or failed job is in that queue."
