#!/usr/bin/env bash
# Build a TensorRT plan on this node's GPU from the newest version of an ONNX model in a Triton
# model repository (run inside NVIDIA's TensorRT container, which has trtexec and python3).
#
# Reads   $REPOSITORY/$SOURCE_MODEL/<newest version>/{model.onnx,manifest.json}
# Writes  $OUT/model.plan and $OUT/export/{model.onnx,manifest.json} (the export the plan came from,
#         which `python -m serving.convert $OUT/export --format tensorrt --plan $OUT/model.plan`
#         then installs as the next version of the plan model).
#         and $OUT/max_batch (the batch size the plan was built for, for the install step's --max-batch)
# The optimisation profile covers batch 1..$MAX_BATCH at the exported image size, as
# serving.tensorrt_build.trtexec_args does (tests/test_engine_builder.py checks that they agree):
# image:Bx3xHxW for a raw graph's float input, image:BxHxWx3 for a final graph's uint8 pixels (the
# shapes are read from the manifest, so both layouts need nothing else here).
# The flags are written here, not asked of that function: this runs in NVIDIA's own TensorRT image
# (the plan must come from the TensorRT that Triton loads), which has python3 but not this project,
# and a ConfigMap can carry only files of this folder. The newest version is found here for the same reason.
# MAX_BATCH defaults to the source model's max_batch_size in its config.pbtxt, so the plan serves
# the batches Triton already forms for that model.
set -euo pipefail

: "${REPOSITORY:?set REPOSITORY to the mounted model repository}"
: "${SOURCE_MODEL:?set SOURCE_MODEL to the name of an onnx-format model in the repository}"
PRECISION="${PRECISION:-fp16}"          # fp16 or fp32
WORKSPACE_MIB="${WORKSPACE_MIB:-1024}"
OUT="${OUT:-/work}"
TIMING_CACHE="${TIMING_CACHE:-$REPOSITORY/.tensorrt-timing.cache}"
TRTEXEC="${TRTEXEC:-trtexec}"

src_dir="$REPOSITORY/$SOURCE_MODEL"
version=""
if [ -d "$src_dir" ]; then
  version="$(find "$src_dir" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' -printf '%f\n' | sort -n | tail -n 1)"
fi
if [ -z "$version" ]; then
  echo "error: $src_dir has no version; convert the run first: python -m serving.convert RUN_DIR" \
       "--repository $REPOSITORY --name $SOURCE_MODEL --format onnx" >&2
  exit 1
fi
src="$src_dir/$version"
if [ -z "${MAX_BATCH:-}" ]; then
  MAX_BATCH="$(sed -n 's/^max_batch_size: *\([0-9][0-9]*\) *$/\1/p' "$src_dir/config.pbtxt" 2>/dev/null | head -n 1)"
  if [ -z "$MAX_BATCH" ]; then
    echo "error: no max_batch_size in $src_dir/config.pbtxt; set MAX_BATCH" >&2
    exit 1
  fi
fi
case "$MAX_BATCH" in ''|*[!0-9]*|0) echo "error: MAX_BATCH must be a positive integer, got '$MAX_BATCH'" >&2; exit 1 ;; esac
for f in model.onnx manifest.json; do
  if [ ! -f "$src/$f" ]; then
    echo "error: $src/$f is missing; $SOURCE_MODEL must be an onnx or python model converted by serving.convert" >&2
    exit 1
  fi
done
case "$PRECISION" in fp16|fp32) ;; *) echo "error: PRECISION must be fp16 or fp32, got $PRECISION" >&2; exit 1 ;; esac

mkdir -p "$OUT/export"
cp "$src/model.onnx" "$src/manifest.json" "$OUT/export/"

# --minShapes/--optShapes/--maxShapes from the manifest's tensor spec (dim 0 is the dynamic batch).
# An assignment, not `read < <(...)`: a failing python3 then stops the script (set -e) instead of
# leaving the flags empty, which would build a plan for batch 1 only.
shape_line="$(python3 - "$src/manifest.json" "$MAX_BATCH" <<'PY'
import json
import sys

inputs = json.load(open(sys.argv[1]))["io_spec"]["inputs"]
batch = int(sys.argv[2])

def shapes(b):
    return ",".join(t["name"] + ":" + "x".join(str(b if i == 0 else d) for i, d in enumerate(t["shape"]))
                    for t in inputs)

print(f"--minShapes={shapes(1)} --optShapes={shapes(batch)} --maxShapes={shapes(batch)}")
PY
)"
read -r -a shape_flags <<<"$shape_line"
if [ "${#shape_flags[@]}" -ne 3 ]; then
  echo "error: could not read the input shapes from $src/manifest.json" >&2
  exit 1
fi

flags=()
if [ "$PRECISION" = fp16 ]; then flags+=(--fp16); fi
echo "building a TensorRT plan from $src (batch 1..$MAX_BATCH, $PRECISION)"
"$TRTEXEC" --onnx="$OUT/export/model.onnx" --saveEngine="$OUT/model.plan" "${shape_flags[@]}" \
  --memPoolSize=workspace:"${WORKSPACE_MIB}"M "${flags[@]}" --timingCacheFile="$TIMING_CACHE"
test -s "$OUT/model.plan"
echo "$MAX_BATCH" > "$OUT/max_batch"
echo "built $OUT/model.plan from $SOURCE_MODEL version $version"
