"""``python -m backchannel_rfc``: the same as the ``backchannel-rfc-stub`` command."""

import sys

from ._stub_cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m backchannel_rfc"))
