#!/usr/bin/env python
"""Show one training sample exactly as the model sees it, supervised tokens marked (``--help`` for the flags).

The same as ``python -m internvl_chat.cli.inspect_data``, where the code lives.
"""

from internvl_chat.cli.inspect_data import main

if __name__ == "__main__":
    raise SystemExit(main())
