#!/usr/bin/env bash
# The whole flow on generated Burgers 1D data, on the CPU in a few minutes:
# generate -> field shards -> codec -> latent shards -> operator streaming from shards ->
# dense test nRMSE next to persistence.
#   bash tools/quickstart.sh [OUT_DIR]        (default runs/quickstart)
set -euo pipefail
out=${1:-runs/quickstart}
# One torch (OpenMP) thread per process unless OMP_NUM_THREADS says otherwise: these models are
# too small for a second thread to pay on 2 cores, where it also competes with the loader
# process, and spinning OpenMP threads slow down many times over when anything else uses the CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python tools/generate_data.py --pde burgers1d --out "$out/burgers1d.h5" --trajectories 128 --steps 40 \
    --resolution 256 --seed 0
# query sets for the 8 epochs the codec trains (the config precomputes 20)
python tools/build_shards.py --config configs/burgers1d_shards.yaml data.path="$out/burgers1d.h5" \
    out="$out/fields" encoder=null epochs=8 overwrite=true
python tools/train.py --config configs/burgers1d_codec.yaml shards="$out/fields" out="$out/codec" overwrite=true
python tools/build_shards.py --config configs/burgers1d_shards.yaml data.path="$out/burgers1d.h5" \
    out="$out/latents" encoder="$out/codec/codec.pt" epochs=8 overwrite=true
python tools/train.py --config configs/burgers1d_operator.yaml shards="$out/latents" \
    codec_checkpoint="$out/codec/codec.pt" out="$out/operator" overwrite=true
python tools/inspect_shards.py "$out/latents" --plot "$out/latents.png"
