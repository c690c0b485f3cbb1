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

# Stage 2: the text-to-image model: 6000 steps from scratch, then continued pretraining
# from the saved weights, 2000 + 4000 steps at a lower peak LR (12 000 steps in all; writes
# $OUT/sd). The encoders and the judge do not depend on it and may train at the same time
# in other shells. (The first 6000 steps were made as: --trainer.max_steps 3000, stopped
# after the step-2000 checkpoint, resumed from it with this config and --ckpt_path; a
# straight run differs only in the cosine horizon of the first 2000 steps and in data order.)
python train.py fit --config configs/miniworld/pretrain.yaml --model.init_args.output_dir /tmp/miniworld-sd-6000
MORE="--model.init_args.learning_rate 3e-4 --model.init_args.warmup_steps 20"
python train.py fit --config configs/miniworld/pretrain.yaml $MORE --trainer.max_steps 2000 \
    --model.init_args.init_from /tmp/miniworld-sd-6000 --model.init_args.output_dir /tmp/miniworld-sd-8000
python train.py fit --config configs/miniworld/pretrain.yaml $MORE --trainer.max_steps 4000 \
    --model.init_args.init_from /tmp/miniworld-sd-8000 --model.init_args.output_dir $OUT/sd

python -m miniworld train-clip --out $OUT/clip
python -m miniworld train-judge --out $OUT/judge      # reads $OUT/vae
python -m miniworld train-dino --out $OUT/dino

python -m miniworld.quality --json $OUT/quality.json --grid miniworld/docs/samples.png
