# Train stage: one interpretable model per method, then its evaluation.


rule train:
    input:
        unpack(train_inputs),
    output:
        model="results/{dataset}/{method}/model.pt",
        log_table="results/{dataset}/{method}/train_log.parquet",
    params:
        config=method_config_json,
        root=data_root(),
        out=folder_of("model"),
        backbone=backbone_override,
        launcher=train_launcher,
    log:
        "logs/{dataset}/{method}/train.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_train.tsv"
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "{params.launcher} --method {wildcards.method} --config-json {params.config:q}"
        " --manifest {input.manifest:q} --root {params.root:q} --out {params.out:q}"
        " {params.backbone} --threads {threads} --quiet > {log:q} 2>&1"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics="results/{dataset}/{method}/metrics_model.parquet",
        probe="results/{dataset}/{method}/linear_probe.pt",
    params:
        root=data_root(),
        config=config_json({"extract": ("split", "batch_size", "device")}),
    log:
        "logs/{dataset}/{method}/evaluate.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_evaluate.tsv"
    priority: 3  # higher first among ready jobs: feeds faithfulness (its probe)
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=train_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr evaluate --model {input.model:q} --manifest {input.manifest:q}"
        " --root {params.root:q} --out {output.metrics:q} --probe-out {output.probe:q}"
        " --config-json {params.config:q} --threads {threads} --quiet > {log:q} 2>&1"


rule evaluation:
    input:
        unpack(evaluation_inputs),
    output:
        evaluation="results/{dataset}/{method}/evaluation.parquet",
    log:
        "logs/{dataset}/{method}/evaluation.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_evaluation.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr evaluation {input:q} --out {output.evaluation:q} > {log:q} 2>&1"
