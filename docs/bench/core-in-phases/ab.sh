#!/bin/bash
# Alternate before (f17e4f6) and after (this checkout) runs of the project's benchmark, on one
# model. Prepare the before tree first:
#   mkdir -p /tmp/before && git archive f17e4f6 service/lstm_serve models | tar -x -C /tmp/before
cd "$(git rev-parse --show-toplevel)"
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then export PYTHONPATH=/tmp/before/service; else unset PYTHONPATH; fi
    .venv/bin/python -c "import lstm_serve,sys; print('$side', lstm_serve.__file__)"
    .venv/bin/lstm-serve bench --only raw,lstm-serve --repeat 1 --no-plots --model-repository /tmp/before/models --out /tmp/ab/$side-$round/results.json 2>&1 | tail -30
  done
done
