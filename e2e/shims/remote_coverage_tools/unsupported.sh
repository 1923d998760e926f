#!/bin/sh
echo "coverage is not supported by the lre e2e shim" >&2
exit 1
