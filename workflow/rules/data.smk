# Data stage: render the synthetic data set (when configured) and read the
# data set into the manifest, parts and rejected tables.


# Real data sets are read in place; only the synthetic one is rendered first
# (defining the rule for it alone keeps it from ever writing into a real
# data set's folder).
if DATA_KIND == "synthetic":

    rule synthesize:
        output:
            images_txt=synthetic_images_txt(),
        params:
            out=folder_of("images_txt"),
            config=config_json(
                {"synthetic": ("genera", "species_per_genus", "images_per_species", "image_size",
                               "train_fraction", "seed", "class_names")}
            ),
        log:
            dataset_log("synthesize"),
        benchmark:
            dataset_benchmark("synthesize")
        threads: synthesize_threads()
        resources:
            mem_mb=2000,
            runtime=30,
            cpus_per_task=cpus_from_threads,
        conda:
            "../envs/trait-discovery.yaml"
        shell:
            "intr synthesize --out {params.out:q} --config-json {params.config:q}"
            " --workers {threads} --quiet > {log:q} 2>&1"


rule prepare:
    input:
        unpack(prepare_inputs),
    output:
        manifest="results/{dataset}/manifest.parquet",
        parts="results/{dataset}/parts.parquet",
        rejected="results/{dataset}/rejected.parquet",
        **GROUND_TRUTH_TABLES,
    params:
        out=folder_of("manifest"),
        root=data_root(),
        config=config_json({"dataset": None}),
    log:
        "logs/{dataset}/prepare.log",
    benchmark:
        "logs/{dataset}/benchmarks/prepare.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        cpus_per_task=cpus_from_threads,
    conda:
        "../envs/trait-discovery.yaml"
    shell:
        "intr prepare --root {params.root:q} --out {params.out:q} --config-json {params.config:q}"
        " --workers {threads} --quiet > {log:q} 2>&1"
