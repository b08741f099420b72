"""``python -m hetcomm.testbed``: check, clean up and measure the emulated WAN."""
import sys

from hetcomm.testbed.probe import main

sys.exit(main())
