#!/bin/sh
# The wheels `slipstream bench gpu` needs on the device machine (Python 3.12, CUDA torch and transformers already
# there, nothing reachable): this project's dependencies that the device image lacks, at the versions installed here.
#   bench/gpu_wheels.sh [DEST]        # DEST defaults to .whl (add /.whl/ to .git/info/exclude); ~5 MiB
# then, on the device, with DEST carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#     PYTHONPATH=/tmp/site:. python3 -m slipstream bench gpu --json
set -eu
dest=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
# Found by running the bench here and listing the distributions of every module it imported, less the image's list
# (/work/.library/device/KINDS.md, "Python packages already there").
names="pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions
structlog redis hiredis dill"
pins=$("$python" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $names)
# shellcheck disable=SC2086  # the pins are separate words on purpose
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $pins
du -sh "$dest"
