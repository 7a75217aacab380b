#!/usr/bin/env bash
# Every measurement the documentation quotes outside the grids (tools/bench_grid.py), as the
# commands that make it: each runs through tools/record.py, which keeps what it measured with its
# provenance in results/docs/NAME.json; tools/results_tables.py turns those files into tables.
#
#   bash tools/measure_docs.sh SECTION ...   # sections: recipes demo data features chunk
#                                            #  segmentation segmentation-seeds label-efficiency
#                                            #  recipes-val (the kept recipe models judged again)
#                                            #  finetune-defaults defaults online-probe
#                                            #  (or all)
#   ONLY="half_e16 ..." bash tools/measure_docs.sh recipes   # only these recipes
#   REPLACE=1 bash tools/measure_docs.sh ...   # a results file's earlier runs dropped (its
#                                              # command changed)
#
# A section's commands re-run from scratch (--fresh where a script resumes) and add one run
# to their results file, so repeated measurements give the ranges the docs quote. The demo
# comes first: its section runs bash scripts/demo.sh from scratch and adds the run to
# results/demo.json (the other sections use its model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=demo_data
MODEL=results/demo/model/model.pth
WORK=results/measure
KEEP=results/docs

record() {  # record NAME [--collect FILE ...] -- COMMAND ...  (REPLACE=1: drop its earlier runs)
    local name=$1; shift
    $PY tools/record.py "$KEEP/$name.json" ${REPLACE:+--replace} "$@"
}

need_model() {
    [ -f "$MODEL" ] || { echo "measure_docs: $MODEL is missing: run bash scripts/demo.sh first" >&2; exit 2; }
}

section_demo() {  # README and docs/evaluation.md: the demo table (results/demo.json)
    rm -rf results/demo
    local start=$SECONDS
    bash scripts/demo.sh
    $PY scripts/demo_summary.py results/demo --json results/demo.json \
        --script-seconds $((SECONDS - start)) > /dev/null
}

section_data() {  # docs/data.md: the demo model through every data source
    need_model
    record data_folder --collect $WORK/data/folder/report.json -- \
        $PY linear_evaluation.py $DATA $MODEL $WORK/data/folder
    record data_npz --collect $WORK/data/npz/report.json -- \
        $PY linear_evaluation.py $DATA/fashion_mnist.npz $MODEL $WORK/data/npz
    record data_list --collect $WORK/data/list/report.json -- \
        $PY linear_evaluation.py $DATA/train.txt $MODEL $WORK/data/list --test-list $DATA/test.txt
    record data_k10 --collect $WORK/data/k10/report.json -- \
        $PY linear_evaluation.py $DATA $MODEL $WORK/data/k10 --samples-per-class 10
    record data_k10_random --collect $WORK/data/k10_random/report.json -- \
        $PY linear_evaluation.py $DATA $MODEL $WORK/data/k10_random --samples-per-class 10 \
        --reference random
}

section_features() {  # docs/features.md and docs/evaluation.md: embed, export, feature analysis
    need_model
    record features_embed --file-sizes $WORK/features/demo_h.npy $WORK/features/demo_h.csv -- \
        $PY embed.py $DATA $MODEL $WORK/features/demo_h
    record features_export --file-sizes $WORK/export/backbone.pth $WORK/export/backbone.pt2 -- \
        $PY export.py $MODEL $WORK/export/backbone
    record feature_analysis --collect $WORK/analysis/analysis.json -- \
        $PY feature_analysis.py $DATA $MODEL $WORK/analysis
    cp $WORK/analysis/tsne_h.png docs/tsne_h_demo.png  # the docs' picture, from the same run
}

section_chunk() {  # docs/distributed.md: --chunk-size, time per step and peak memory
    for chunk in none 64 32 16; do
        local flag=() ; [ $chunk = none ] || flag=(--chunk-size $chunk)
        record chunk_$chunk --collect $WORK/chunk/$chunk/run.json -- \
            $PY main.py $DATA $WORK/chunk/$chunk --epochs 1 --samples 640 -bs 128 -nw 2 \
            --fresh "${flag[@]}"
    done
}

segment_run() {  # segment_run NAME FLAG ...: the demo model, segment.py's flags after RESPATH
    local name=$1; shift
    local S=$DATA/segmentation
    record segment_$name --collect $WORK/segment/$name/metrics.json -- \
        $PY segment.py $S/train.txt $MODEL $WORK/segment/$name --val-list $S/val.txt \
        --test-list $S/test.txt --classes $S/classes.txt --fresh "$@"
}

section_segmentation() {  # docs/evaluation.md: the segmentation table
    need_model
    [ -f $DATA/segmentation/train.txt ] || $PY make_demo_data.py $DATA --segmentation
    segment_run fcn_e10
    segment_run fcn_e10_baseline --baseline
    segment_run fcn_e10_lr3e-4 --lr 3e-4
    segment_run fcn_e10_lpft --decoder-epochs 1 --encoder-lr-ratio 0.1 --encoder-bn frozen
    segment_run fcn_e5 --epochs 5
    segment_run fcn_e5_baseline --epochs 5 --baseline
    segment_run fcn_e5_freeze --epochs 5 --freeze
    segment_run fcn_e5_baseline_freeze --epochs 5 --baseline --freeze
    segment_run fcn_e5_os8 --epochs 5 --output-stride 8
    segment_run fcn_e5_native --epochs 5 --output-stride native
    segment_run fcn_e5_native_baseline --epochs 5 --output-stride native --baseline
    segment_run unet_e5 --epochs 5 --decoder unet
    segment_run unet_e5_baseline --epochs 5 --decoder unet --baseline
    segment_run unet_e5_freeze --epochs 5 --decoder unet --freeze
    segment_run unet_e5_lpft --epochs 5 --decoder unet --decoder-epochs 1 --encoder-lr-ratio 0.1 \
        --encoder-bn frozen
    segment_run unet_e5_os4 --epochs 5 --decoder unet --output-stride 4
    cp $WORK/segment/fcn_e10/predictions.png docs/segmentation_demo.png
}

section_segmentation_seeds() {  # FCN fine-tuned against scratch over 3 seeds (seeds_*.json)
    need_model
    [ -f $DATA/segmentation/train.txt ] || $PY make_demo_data.py $DATA --segmentation
    local S=$DATA/segmentation name
    for epochs in 5 10; do
        for seed in 0 1 2; do
            for baseline in "" --baseline; do
                name=fcn_e${epochs}${baseline:+_baseline}_seed$seed
                record seeds_segment_$name --collect $WORK/segment/$name/metrics.json -- \
                    $PY segment.py $S/train.txt $MODEL $WORK/segment/$name --val-list $S/val.txt \
                    --test-list $S/test.txt --classes $S/classes.txt --fresh --epochs $epochs \
                    --seed $seed $baseline
            done
        done
    done
}

section_label_efficiency() {  # docs/evaluation.md: the label-efficiency table
    need_model
    rm -rf $WORK/label_efficiency
    record label_efficiency --collect $WORK/label_efficiency/label_efficiency.csv -- \
        $PY label_efficiency.py $DATA/fashion_mnist.npz $MODEL $WORK/label_efficiency \
        --budgets-per-class 5 20 --epochs 10 --min-steps 60 --validations 4 -bs 32 -nw 0
    cp $WORK/label_efficiency/label_efficiency.png docs/label_efficiency_demo.png
}

section_online_probe() {  # docs/evaluation.md: the online probe against what it could reach
    need_model
    mkdir -p $WORK/online_probe
    record online_probe --collect $WORK/online_probe/probe_ceiling.json -- \
        $PY tools/probe_ceiling.py $DATA $MODEL $WORK/online_probe/probe_ceiling.json
}

wanted() {  # wanted NAME: NAME is in $ONLY, or $ONLY is empty
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}

recipe_run() {  # recipe_run NAME MAIN_FLAG ...: pretrain on the demo data, judge on validation
    local name=$1; shift
    wanted $name || return 0
    local out=$WORK/recipes/$name
    record recipe_${name}_pretrain --collect $out/run.json -- \
        $PY main.py $DATA $out -nw 2 --fresh "$@"
    recipe_val $name $out
}

recipe_val() {  # recipe_val NAME RUN: judge RUN's model (a main.py RESPATH) on validation
    local name=$1 run=$2 out=$WORK/recipes/$1
    mkdir -p $out
    record recipe_${name}_val --collect $run/run.json --collect $out/val_eval.json -- \
        $PY tools/val_eval.py $DATA $run/model/model.pth $out/val_eval.json --references
}

section_recipes_val() {  # the kept recipe models judged again (after a change of the probe)
    local run name
    # the 14-epoch recipe's own model is gone; the demo's is the same command's
    ! wanted half_bs250_e14 || [ -f $WORK/recipes/half_bs250_e14/model/model.pth ] || \
        recipe_val half_bs250_e14 results/demo
    for run in $WORK/recipes/*/; do
        name=$(basename $run)
        wanted $name && [ -f $run/model/model.pth ] || continue
        recipe_val $name ${run%/}
    done
}

section_recipes() {  # docs/defaults.md: the demo recipe, chosen on validation images only
    recipe_run cifar_bs250_e3 --stem cifar --epochs 3 -bs 250
    recipe_run half_bs250_e8 --stem half --epochs 8 -bs 250
    recipe_run half_bs128_e8 --stem half --epochs 8 -bs 128
    recipe_run half_bs250_e14 --stem half --epochs 14 -bs 250
    recipe_run half_bs250_t01_e14 --stem half --epochs 14 -bs 250 --temperature 0.1
    # the batched augmentation (--gpu-aug, on the CPU here): the same distributions
    recipe_run half_lr1_e14 --stem half --epochs 14 -bs 250 --gpu-aug -nw 0 --lr 1.0
    recipe_run half_ms02_e14 --stem half --epochs 14 -bs 250 --gpu-aug -nw 0 --min-scale 0.2
    recipe_run half_e16 --stem half --epochs 16 -bs 250 --gpu-aug -nw 0
    recipe_run half_t05_e14 --stem half --epochs 14 -bs 250 --temperature 0.5
    # beyond the demo's budget: what more pretraining buys
    recipe_run half_e40 --stem half --epochs 40 -bs 250
}

finetune_run() {  # finetune_run NAME FINETUNE_FLAGS: LP-FT settings at 20 labels per class
    need_model
    local name=$1; shift
    rm -rf $WORK/finetune_defaults/$name
    record finetune_$name --collect $WORK/finetune_defaults/$name/label_efficiency.csv -- \
        $PY label_efficiency.py $DATA/fashion_mnist.npz $MODEL $WORK/finetune_defaults/$name \
        --budgets-per-class 20 --methods finetune --epochs 10 --min-steps 60 --validations 4 \
        -bs 32 -nw 0 --finetune-args "$*"
}

section_finetune_defaults() {  # docs/defaults.md: fine-tuning's defaults, on validation accuracy
    finetune_run defaults
    finetune_run ratio_1 --encoder-lr-ratio 1
    finetune_run lr_0.01 --lr 0.01
    finetune_run bn_train --encoder-bn train
    finetune_run head_random --head-init random
}

defaults_run() {  # defaults_run NAME MAIN_FLAG ...: pretrain, then the probe (and a random encoder)
    local name=$1; shift
    local out=$WORK/defaults/$name
    record defaults_${name}_pretrain --collect $out/run.json -- \
        $PY main.py $DATA $out -bs 250 -nw 2 --fresh "$@"
    record defaults_${name}_probe --collect $out/probe/report.json -- \
        $PY linear_evaluation.py $DATA $out/model/model.pth $out/probe -bs 250 -nw 2
}

section_defaults() {  # docs/defaults.md: one flag changed from the demo's recipe per row
    defaults_run imagenet_e15 --epochs 15 --stem imagenet
    record defaults_imagenet_e15_random --collect $WORK/defaults/imagenet_e15/random/report.json -- \
        $PY linear_evaluation.py $DATA $WORK/defaults/imagenet_e15/model/model.pth \
        $WORK/defaults/imagenet_e15/random -bs 250 -nw 2 --reference random
    defaults_run cifar_e1 --epochs 1
    defaults_run min_scale_0.2 --epochs 3 --min-scale 0.2
    defaults_run temperature_0.5 --epochs 3 --temperature 0.5
    defaults_run adamw --epochs 3 --optimizer adamw --lr 1e-3 --weight-decay 1e-2
}

sections=("$@")
[ ${#sections[@]} -gt 0 ] || { sed -n 2,11p "$0"; exit 2; }
[ "${sections[0]}" != all ] || sections=(recipes demo data features chunk segmentation label-efficiency finetune-defaults defaults online-probe)
for s in "${sections[@]}"; do
    declare -F "section_${s//-/_}" > /dev/null || { echo "measure_docs: unknown section $s" >&2; exit 2; }
done
for s in "${sections[@]}"; do
    echo "=== measure_docs: $s ($(date +%T))"
    "section_${s//-/_}"
done
