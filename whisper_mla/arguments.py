"""Range checks for numeric script arguments, with the project's expected/found/fix message.

    check_number("--batch_size", args.batch_size, minimum=1)
    check_number("--distill_alpha", args.distill_alpha, minimum=0, maximum=1)
    check_number("--max_samples", args.max_samples, minimum=1, optional=True)   # None means "no limit"
"""

import math


def check_number(
    flag: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
    fix: str | None = None,
) -> None:
    """Raises unless `value` lies in the given range (bounds are inclusive; `above`/`below` are exclusive).

    Args:
        flag: the argument as the user wrote it, e.g. "--batch_size".
        value: the parsed value; NaN is always refused.
        optional: None is allowed (it means "not set").
        fix: how to fix it; default: pass a value in the range.

    Raises:
        ValueError: "--batch_size expects a number >= 1, but found 0; pass a value in that range."
    """
    if value is None and optional:
        return
    bounds = [f">= {minimum:g}" if minimum is not None else None, f"> {above:g}" if above is not None else None,
              f"<= {maximum:g}" if maximum is not None else None, f"< {below:g}" if below is not None else None]
    expected = "a number " + " and ".join(b for b in bounds if b) if any(bounds) else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = ((minimum is None or value >= minimum) and (above is None or value > above)
              and (maximum is None or value <= maximum) and (below is None or value < below))
    if not ok:
        raise ValueError(f"{flag} expects {expected}{' (or unset)' if optional else ''}, but found {value!r}; "
                         f"{fix or 'pass a value in that range'}.")


def run_cli(main) -> None:
    """Runs a script's `main()` for the command line: a bad input (every check in this project raises a ValueError
    subclass with an expected/found/fix sentence) ends with that sentence on stderr and exit status 1, not a
    traceback through torch or transformers. Set WHISPER_MLA_TRACEBACK=1 to see the traceback anyway."""
    import os
    import sys

    try:
        main()
    except ValueError as err:
        if os.environ.get("WHISPER_MLA_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
