#!/usr/bin/env python
"""Validate every line of every dataset of a meta file before a GPU is rented (``--help`` for the flags).

The same as ``python -m internvl_chat.cli.check_data``, where the code lives.
"""

from internvl_chat.cli.check_data import main

if __name__ == "__main__":
    raise SystemExit(main())
