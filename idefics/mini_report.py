"""`python -m idefics.mini_report`: the idefics-mini report (`idefics.mini.report`)."""

from idefics.mini.report import main

if __name__ == "__main__":
    raise SystemExit(main())
