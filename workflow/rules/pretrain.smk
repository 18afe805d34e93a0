# Optional: rebuild the small backbone the embedded default ships
# (config: backbone_pretrain.enabled). The pretraining species are rendered
# by the same generator but never include a target species.

if pretrain_enabled():

    rule synthesize_pretrain:
        input:
            recipe=config["backbone_pretrain"]["recipe"],
        output:
            images_txt=f"{PRETRAIN_DIR}/data/images.txt",
        params:
            out=folder_of("images_txt"),
        log:
            "logs/backbone_pretrain/synthesize.log",
        benchmark:
            "logs/backbone_pretrain/benchmarks/synthesize.tsv"
        threads: 2
        resources:
            mem_mb=2000,
            runtime=30,
            cpus_per_task=cpus_from_threads,
        conda:
            "../envs/trait-discovery.yaml"
        shell:
            "intr synthesize --recipe {input.recipe:q}"
            " --out {params.out:q} --workers {threads} --quiet > {log:q} 2>&1"

    rule prepare_pretrain:
        input:
            images_txt=rules.synthesize_pretrain.output.images_txt,
        output:
            manifest=f"{PRETRAIN_DIR}/tables/manifest.parquet",
        params:
            root=folder_of_input("images_txt"),
            out=folder_of("manifest"),
            config='{"dataset": {"kind": "synthetic"}}',
        log:
            "logs/backbone_pretrain/prepare.log",
        benchmark:
            "logs/backbone_pretrain/benchmarks/prepare.tsv"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
            cpus_per_task=cpus_from_threads,
        conda:
            "../envs/trait-discovery.yaml"
        shell:
            "intr prepare --root {params.root:q} --out {params.out:q} --config-json {params.config:q}"
            " --workers {threads} --quiet > {log:q} 2>&1"

    rule pretrain:
        input:
            manifest=rules.prepare_pretrain.output.manifest,
            images_txt=rules.synthesize_pretrain.output.images_txt,
            recipe=config["backbone_pretrain"]["recipe"],
        output:
            weights=f"{PRETRAIN_DIR}/backbone.pt",
            log_table=f"{PRETRAIN_DIR}/pretrain_log.parquet",
        params:
            root=folder_of_input("images_txt"),
        log:
            "logs/backbone_pretrain/pretrain.log",
        benchmark:
            "logs/backbone_pretrain/benchmarks/pretrain.tsv"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=180,
            gpu=config["backbone_pretrain"]["gpus"],
            cpus_per_task=cpus_from_threads,
        conda:
            "../envs/trait-discovery.yaml"
        shell:
            "intr pretrain --manifest {input.manifest:q} --root {params.root:q}"
            " --recipe {input.recipe:q} --out {output.weights:q}"
            " --log {output.log_table:q} --threads {threads} --quiet > {log:q} 2>&1"
