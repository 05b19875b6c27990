from __future__ import annotations

from forwarder.cli import main

main()
