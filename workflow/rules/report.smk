# Report stage: the self-contained HTML trait report of the data set, all methods side by side.


rule report:
    input:
        evaluation=expand("results/{{dataset}}/{method}/evaluation.parquet", method=METHODS),
        analysis=expand("results/{{dataset}}/{method}/contrasts.parquet", method=METHODS),
        maps=expand("results/{{dataset}}/{method}/baseline_maps.parquet", method=METHODS),
    output:
        html=report(
            "results/{dataset}/report.html",
            caption="../report/trait_report.rst",
            category="Trait report",
        ),
    params:
        config=lambda wildcards: json.dumps(config, sort_keys=True),
        methods=" ".join(METHODS),
        root=data_root(),
        results=folder_of("html"),
    log:
        "logs/{dataset}/report.log",
    benchmark:
        "logs/{dataset}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../environment.yml"
    shell:
        "intr report --results {params.results:q} --root {params.root:q} --methods {params.methods}"
        " --config-json {params.config:q} --out {output.html:q} --quiet > {log:q} 2>&1"
