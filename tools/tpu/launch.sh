#!/usr/bin/env bash
# Train vdm_jax on a Cloud TPU VM pod slice: one process per TPU host, all started with the
# same command; JAX's distributed runtime finds the other hosts itself (--multihost).
#
#   tools/tpu/launch.sh create   # create the slice
#   tools/tpu/launch.sh setup    # copy this checkout to every host and install it
#   tools/tpu/launch.sh start    # start training on every host (in the background)
#   tools/tpu/launch.sh logs     # follow host 0's log
#   tools/tpu/launch.sh stop     # SIGTERM: every host saves a checkpoint and exits
#   tools/tpu/launch.sh delete   # delete the slice
#
# Settings (environment variables; the defaults are examples to override):
#   TPU_NAME     the slice's name                        (vdm-jax)
#   ZONE         its zone                                (us-central2-b)
#   ACCELERATOR  the slice type                          (v4-32: 4 hosts x 4 chips)
#   RUNTIME      the TPU VM software version             (tpu-ubuntu2204-base)
#   PROJECT      the Google Cloud project                (gcloud's default)
#   CONFIG       the experiment config                   (vdm_jax/configs/cifar10.py)
#   WORKDIR      a gs:// folder every host can write     (required for start)
#   FLAGS        more flags for python3 -m vdm_jax, e.g. "--config.parallel.fsdp=4"
#
# Running `start` again after a stop or a preemption resumes from the latest checkpoint in
# WORKDIR. The data set must be readable on every host (tfds data in a gs:// data_dir, e.g.
# FLAGS="--config.data.data_dir=gs://my-bucket/tfds").
set -euo pipefail

TPU_NAME=${TPU_NAME:-vdm-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-vdm_jax/configs/cifar10.py}
WORKDIR=${WORKDIR:-}
FLAGS=${FLAGS:-}
REMOTE_DIR=vdm_jax
LOG=vdm_jax_train.log
# The process that start launches and stop signals.
TRAIN_COMMAND="python3 -m vdm_jax"

gcloud_tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_all_hosts() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    # The checkout as it is here (tracked files), the same on every host.
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    archive=$(mktemp -t vdm_jax.XXXXXX.tar.gz)
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    gcloud_tpu scp "$archive" "$TPU_NAME":vdm_jax.tar.gz --worker=all
    rm -f "$archive"
    on_all_hosts "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf vdm_jax.tar.gz -C $REMOTE_DIR \
      && python3 -m pip install -q -U pip && python3 -m pip install -q -e "./$REMOTE_DIR[cloud]" \
      && python3 -m pip install -q -U 'jax[tpu]' \
      && python3 -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
    ;;
  start)
    if [[ -z "$WORKDIR" || "$WORKDIR" != gs://* ]]; then
      echo "start: set WORKDIR to a gs:// folder that every host can write" >&2
      exit 1
    fi
    # nohup: training goes on when the ssh session ends. Every host logs to ~/$LOG.
    on_all_hosts "cd $REMOTE_DIR && nohup $TRAIN_COMMAND --multihost \
      --config=$CONFIG --workdir=$WORKDIR $FLAGS > ~/$LOG 2>&1 < /dev/null &"
    echo "started; follow with: $0 logs"
    ;;
  logs)
    gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 100 -f ~/$LOG"
    ;;
  stop)
    # SIGTERM: each process saves a checkpoint at the same step and exits with status 0. The
    # pattern is anchored at the start of the command line that start runs (nohup execs it), so
    # it matches the training process and not the remote shell that runs this pkill.
    on_all_hosts "pkill -TERM -f '^$TRAIN_COMMAND ' || echo 'stop: no training process on this host'"
    ;;
  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
