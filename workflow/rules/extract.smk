# Extract stage: every attention map of a trained model into Parquet tables,
# and the faithfulness test of its maps against CAM baselines.
#
# Priorities (evaluate, discover, extract 3; faithfulness 2; region_effects 1; the rest 0): on a few
# cores the jobs that unlock the long ones run first, then the longest, so that the short ones
# (counterfactual, analyze) fill the end instead of a long job running alone (benchmarks/README.md).


rule discover:
    input:
        model=rules.train.output.model,
        manifest=rules.prepare.output.manifest,
    output:
        parts="results/{dataset}/{method}/discovered_parts.parquet",
    params:
        config=config_json({"discovery": None, "extract": ("split", "batch_size", "device")}),
        root=data_root(),
    log:
        "logs/{dataset}/{method}/discover.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_discover.tsv"
    priority: 3  # higher first among ready jobs: feeds region_effects
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr discover --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out {output.parts:q} --config-json {params.config:q} --threads {threads} --quiet > {log:q} 2>&1"


# Counterfactual renders exist only for the synthetic data (the generator re-renders an image).
if DATA_KIND == "synthetic":

    rule counterfactual:
        input:
            model=rules.train.output.model,
            manifest=rules.prepare.output.manifest,
            images_txt=rules.synthesize.output.images_txt,
        output:
            table="results/{dataset}/{method}/counterfactuals.parquet",
            examples="results/{dataset}/{method}/counterfactual_examples.parquet",
        params:
            config=config_json({"counterfactual": None, "synthetic": None,
                                "extract": ("split", "batch_size", "device")}),
            root=folder_of_input("images_txt"),
        log:
            "logs/{dataset}/{method}/counterfactual.log",
        benchmark:
            "logs/{dataset}/benchmarks/{method}_counterfactual.tsv"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=extract_resources_gpu,
            cpus_per_task=cpus_from_threads,
        conda:
            "../envs/trait-discovery.yaml"
        shell:
            "intr counterfactual --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
            " --out {output.table:q} --examples-out {output.examples:q} --config-json {params.config:q}"
            " --threads {threads} --quiet > {log:q} 2>&1"


rule extract:
    input:
        unpack(extract_inputs),
    output:
        predictions="results/{dataset}/{method}/predictions.parquet",
        attention="results/{dataset}/{method}/attention.parquet",
        head_ranks="results/{dataset}/{method}/head_ranks.parquet",
        pair_head_ranks="results/{dataset}/{method}/pair_head_ranks.parquet",
        trait_features="results/{dataset}/{method}/trait_features.parquet",
        lookalikes="results/{dataset}/{method}/lookalikes.parquet",
    params:
        config=config_json({"extract": ("split", "batch_size", "top_heads", "siblings_k", "device")}),
        root=data_root(),
        out=folder_of("attention"),
        tables="predictions,attention,head_ranks,pair_head_ranks,trait_features,lookalikes",
    log:
        "logs/{dataset}/{method}/extract.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_extract.tsv"
    priority: 3  # higher first among ready jobs: feeds faithfulness
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr extract --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out {params.out:q} --tables {params.tables} --config-json {params.config:q} --threads {threads} --quiet"
        " > {log:q} 2>&1"


# The region effects share no pass with the rest of extraction: a job of their own runs beside
# extract (and then beside faithfulness), so two cores stay busy.
rule region_effects:
    input:
        unpack(region_effects_inputs),
    output:
        region_effects="results/{dataset}/{method}/region_effects.parquet",
    params:
        config=config_json(
            {"extract": ("split", "batch_size", "siblings_k", "regions", "region_radius", "region_cells",
                         "blur_sigma", "occlusion", "region_fill", "contrast_images", "device")}
        ),
        root=data_root(),
        out=folder_of("region_effects"),
        regions=region_table_args,
    log:
        "logs/{dataset}/{method}/region_effects.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_region_effects.tsv"
    priority: 1  # higher first among ready jobs: the next longest
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr extract --model {input.model:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out {params.out:q} --tables region_effects {params.regions} --config-json {params.config:q}"
        " --threads {threads} --quiet > {log:q} 2>&1"


rule faithfulness:
    input:
        model=rules.train.output.model,
        manifest=rules.prepare.output.manifest,
        attention=rules.extract.output.attention,
        probe=rules.evaluate.output.probe,
    output:
        maps="results/{dataset}/{method}/baseline_maps.parquet",
        metrics="results/{dataset}/{method}/metrics_faithfulness.parquet",
    params:
        config=config_json(
            {"extract": ("split", "batch_size", "top_heads", "blur_sigma", "occlusion", "faithfulness_images",
                         "faithfulness_steps", "device")}
        ),
        root=data_root(),
    log:
        "logs/{dataset}/{method}/faithfulness.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_faithfulness.tsv"
    priority: 2  # higher first among ready jobs: the longest job, started first
    threads: 1  # small CPU models run fastest on one thread each, two jobs side by side; raise with --set-threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=extract_resources_gpu,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr faithfulness --model {input.model:q} --manifest {input.manifest:q} --attention {input.attention:q}"
        " --root {params.root:q} --out-maps {output.maps:q} --out-metrics {output.metrics:q} --probe {input.probe:q}"
        " --config-json {params.config:q}"
        " --threads {threads} --quiet > {log:q} 2>&1"
