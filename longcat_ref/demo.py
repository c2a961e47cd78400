"""`python -m longcat_ref.demo`: the command-line demo, kept at this short name (the code is tools/demo.py)."""

from longcat_ref.tools.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
