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
        section=analysis_options_json,
        root=data_root(),
        method_dir=folder_of_input("attention"),
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
        "../../environment.yml"
    shell:
        "intr analyze --method-dir {params.method_dir:q} --manifest {input.manifest:q} --root {params.root:q}"
        " --out {params.out:q} --section-json {params.section:q} --quiet > {log:q} 2>&1"
