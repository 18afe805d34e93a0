# Report stage: the self-contained HTML trait report of the data set, all methods side by side.


rule report:
    input:
        unpack(report_inputs),
    output:
        html=report(
            "results/{dataset}/report.html",
            caption="../report/trait_report.rst",
            category="Trait report",
        ),
    params:
        config=whole_config_json,
        methods=report_method_args,
        ground_truth=report_pairs_arg,
        root=data_root(),
    log:
        "logs/{dataset}/report.log",
    benchmark:
        "logs/{dataset}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr report --manifest {input.manifest:q} --parts {input.parts:q} {params.ground_truth} {params.methods}"
        " --root {params.root:q} --config-json {params.config:q} --out {output.html:q} --quiet > {log:q} 2>&1"
