#!/usr/bin/env bash
# Rebuild everything in miniworld/pretrained/ from scratch, on a CPU, then measure it.
# Run from the repository root. One thread per job: on a shared 2-core machine, several
# single-threaded jobs run faster than one job with two threads that wait on each other.
set -euo pipefail
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=miniworld/pretrained

# Stage 1: the VAE (1000 steps from scratch, then 2500 more from that checkpoint, as it
# was made; the world render of 40k images is cached on the first call).
python - <<'EOF'
from miniworld.vae import train_vae
train_vae("/tmp/miniworld-vae-1000", steps=1000, log_every=25)
train_vae("miniworld/pretrained/vae", steps=2500, init="/tmp/miniworld-vae-1000")
EOF

# Stage 2: the text-to-image model (6000 steps; writes $OUT/sd). The encoders and the
# judge do not depend on it and may train at the same time in other shells.
# (The shipped model was made as: --trainer.max_steps 3000, stopped after the step-2000
# checkpoint, resumed from it with this config and --ckpt_path; a straight run differs
# only in the cosine horizon of the first 2000 steps and in data order.)
python train.py fit --config configs/miniworld/pretrain.yaml

python -m miniworld train-clip --out $OUT/clip
python -m miniworld train-judge --out $OUT/judge      # reads $OUT/vae
python -m miniworld train-dino --out $OUT/dino

python -m miniworld.quality --json $OUT/quality.json --grid miniworld/docs/samples.png
