# Analyze stage: trait discovery on the extracted tables (no network runs here).


rule analyze:
    input:
        unpack(analyze_inputs),
    output:
        head_types="results/{dataset}/{method}/head_types.parquet",
        traits="results/{dataset}/{method}/traits.parquet",
        trait_members="results/{dataset}/{method}/trait_members.parquet",
        regions="results/{dataset}/{method}/regions.parquet",
        contrasts="results/{dataset}/{method}/contrasts.parquet",
        metrics="results/{dataset}/{method}/metrics_analysis.parquet",
    params:
        config=config_json(
            {"analysis": None, "extract": ("regions", "region_radius", "region_cells", "contrast_images")}
        ),
        ground_truth=optional_table_args,
        root=data_root(),
        out=folder_of("traits"),
    log:
        "logs/{dataset}/{method}/analyze.log",
    benchmark:
        "logs/{dataset}/benchmarks/{method}_analyze.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr analyze --attention {input.attention:q} --predictions {input.predictions:q}"
        " --head-ranks {input.head_ranks:q} --pair-head-ranks {input.pair_head_ranks:q}"
        " --region-effects {input.region_effects:q}"
        " --trait-features {input.trait_features:q} --baseline-maps {input.baseline_maps:q}"
        " --manifest {input.manifest:q} --parts {input.parts:q} {params.ground_truth}"
        " --root {params.root:q} --out {params.out:q} --config-json {params.config:q} --quiet > {log:q} 2>&1"
