#!/bin/sh
# Runs a Python test with Debian's interpreter, which has python3-jenkins
# (a python3 earlier on PATH, such as a pyenv one, may not).
exec /usr/bin/python3 "$@"
