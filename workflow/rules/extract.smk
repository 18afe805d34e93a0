# Extract stage: every attention map of a trained model into Parquet tables,
# and the faithfulness test of its maps against CAM baselines.


rule extract:
    input:
        model=rules.train.output.model,
        manifest=rules.prepare.output.manifest,
    output:
        predictions="results/{dataset}/{method}/predictions.parquet",
        attention="results/{dataset}/{method}/attention.parquet",
        head_ranks="results/{dataset}/{method}/head_ranks.parquet",
        region_effects="results/{dataset}/{method}/region_effects.parquet",
        trait_features="results/{dataset}/{method}/trait_features.parquet",
        lookalikes="results/{dataset}/{method}/lookalikes.parquet",
    params:
        section=section_json("extract", exclude=("faithfulness_images", "faithfulness_steps", "gpus")),
        root=data_root(),
        out=folder_of("attention"),
    log:
        "logs/{dataset}/{method}/extract.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_extract.tsv"
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../../environment.yml"
    shell:
        "intr extract --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out {params.out:q} --section-json {params.section:q} --threads {threads} --quiet > {log:q} 2>&1"


rule faithfulness:
    input:
        model=rules.train.output.model,
        manifest=rules.prepare.output.manifest,
    output:
        maps="results/{dataset}/{method}/baseline_maps.parquet",
        metrics="results/{dataset}/{method}/metrics_faithfulness.parquet",
    params:
        section=section_json("extract"),
        root=data_root(),
    log:
        "logs/{dataset}/{method}/faithfulness.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_faithfulness.tsv"
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../../environment.yml"
    shell:
        "intr faithfulness --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out-maps {output.maps:q} --out-metrics {output.metrics:q} --section-json {params.section:q}"
        " --threads {threads} --quiet > {log:q} 2>&1"
