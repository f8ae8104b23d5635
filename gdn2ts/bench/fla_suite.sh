#!/usr/bin/env bash
# FLA's own GDN-2 tests (tests/ops/test_gdn2.py of flash-linear-attention) against gdn2ts.compat.fla, from the
# repository root, on the GPU machine (its tests need CUDA; on a CPU only the chunk_size check runs):
#
#   bash gdn2ts/bench/fla_suite.sh [pytest arguments...]
#
# Expects, placed by the operator and never committed (the folder is git-ignored; carry it to the GPU machine):
#   .fla_tests/tests/ops/test_gdn2.py and .fla_tests/tests/conftest.py, from FLA's public repository
# and FLA 0.6.0's wheels in .whl/ (installed into /tmp/site). FLA's test keeps FLA's naive reference, gate
# references, assert_close and GatedDeltaNet2 layer; only its import of chunk_gdn2 and fused_recurrent_gdn2 is
# rewritten (sed) to gdn2ts.compat.fla, in a copy under a temporary folder. A pytest plugin written beside it
# makes FLA's layer module (fla.layers.gdn2) call the compat functions too, and makes FLA's own chunk_gdn2 and
# fused_recurrent_gdn2 raise if anything still calls them. The log and a JUnit record go to $OUT (default
# /tmp/out); the last line counts passed, failed, skipped and errors. The exit status is pytest's.
set -u
OUT=${OUT:-/tmp/out}
PY=${PYTHON:-python3}
SRC=.fla_tests/tests
mkdir -p "$OUT"
for f in "$SRC/ops/test_gdn2.py" "$SRC/conftest.py"; do
    if [ ! -f "$f" ]; then
        echo "fla_suite: $f is missing; place FLA's tests/ops/test_gdn2.py and tests/conftest.py under $SRC/" >&2
        exit 2
    fi
done
W=$(mktemp -d /tmp/fla_suite.XXXXXX)
# the package as the GPU steps lay it out: kernels/ as gdn2ts/kernels, no install needed
mkdir -p "$W/pkg" "$W/fla/tests/ops"
cp -r gdn2ts "$W/pkg/" && rm -rf "$W/pkg/gdn2ts/kernels" && cp -r kernels "$W/pkg/gdn2ts/kernels"
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$W/pkg:$W/plugin${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# FLA's assert_close only warns on a failed comparison when FLA_CI_ENV=1: every comparison must fail here
unset FLA_CI_ENV

cp "$SRC/conftest.py" "$W/fla/tests/conftest.py"
OLD='from fla.ops.gdn2 import chunk_gdn2, fused_recurrent_gdn2, naive_recurrent_gdn2'
NEW='from fla.ops.gdn2 import naive_recurrent_gdn2\nfrom gdn2ts.compat.fla import chunk_gdn2, fused_recurrent_gdn2'
sed "s/^$OLD\$/$NEW/" "$SRC/ops/test_gdn2.py" > "$W/fla/tests/ops/test_gdn2.py"
if ! grep -q '^from gdn2ts.compat.fla import chunk_gdn2, fused_recurrent_gdn2$' "$W/fla/tests/ops/test_gdn2.py" ||
        grep -q 'import.*\(chunk_gdn2\|fused_recurrent_gdn2\).*' <(grep '^from fla' "$W/fla/tests/ops/test_gdn2.py"); then
    echo "fla_suite: the test file's import line is not FLA's as expected ($OLD); nothing was run" >&2
    exit 2
fi
echo "=== the rewritten imports"
diff "$SRC/ops/test_gdn2.py" "$W/fla/tests/ops/test_gdn2.py"

mkdir -p "$W/plugin"
cat > "$W/plugin/gdn2ts_fla_compat.py" <<'EOF'
"""Loaded with -p: FLA's GatedDeltaNet2 layer runs gdn2ts.compat.fla, and FLA's own ops refuse to run."""
import fla.layers.gdn2 as layer
import fla.ops.gdn2 as ops
import fla.ops.gdn2.chunk as ops_chunk
import fla.ops.gdn2.fused_recurrent as ops_recurrent

from gdn2ts.compat import fla as compat

for name in ("chunk_gdn2", "fused_recurrent_gdn2"):
    assert hasattr(layer, name), f"fla.layers.gdn2 no longer names {name}: the layer cannot be pointed at compat"
    setattr(layer, name, getattr(compat, name))

    def refuse(*args, _name=name, **kwargs):
        raise AssertionError(f"FLA's own {_name} was called; the suite must run gdn2ts.compat.fla")

    for module in (ops, ops_chunk, ops_recurrent):
        if hasattr(module, name):
            setattr(module, name, refuse)
EOF

cd "$W/fla" || exit 1
echo "=== pytest tests/ops/test_gdn2.py against gdn2ts.compat.fla"
"$PY" -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
"$PY" -m pytest -p gdn2ts_fla_compat -p no:cacheprovider -rs -q --junitxml="$OUT/fla_suite.xml" \
    tests/ops/test_gdn2.py "$@" 2>&1 | tee "$OUT/fla_suite.log"
rc=${PIPESTATUS[0]}
"$PY" - "$OUT/fla_suite.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"fla_suite: no JUnit record ({e})")
# one outcome per test (a test that fails and then errors in its teardown counts once, as failed)
counts = dict(passed=0, failed=0, skipped=0, errors=0)
for case in root.iter("testcase"):
    tags = {child.tag for child in case}
    key = "failed" if "failure" in tags else "errors" if "error" in tags else "skipped" if "skipped" in tags \
        else "passed"
    counts[key] += 1
print("FLA suite: {passed} passed, {failed} failed, {skipped} skipped, {errors} errors".format(**counts))
EOF
exit "$rc"
