"""Bahdanau-attention NMT on TensorFlow 2: package definition."""
import setuptools

setuptools.setup(
    name="bahdanau-nmt",
    version="0.1.0",
    description="Neural machine translation with Bahdanau attention: tf.data, "
                "MirroredStrategy, mixed precision, XLA, TensorBoard.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["trainer", "trainer.*",
                                               "input_pipeline", "input_pipeline.*",
                                               "configs", "configs.*", "launch", "launch.*",
                                               "benchmarks", "benchmarks.*"]),
    # The embedded Tatoeba corpus (input_pipeline/data/deu-eng, ~4.9 MB) with its licence.
    package_data={"input_pipeline": ["data/*/*.tsv.gz", "data/*/*.md", "data/*/*.txt"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        # Keras 3 as TF 2.21 ships it; train.py relies on its optimizer's all-reduce hook
        # (with a fallback), so minor releases are admitted only once tried.
        "keras>=3.12,<3.16",
        "tensorflow-text>=2.21,<2.22",  # its minor version must match TensorFlow's
        "tensorflow-datasets>=4.9,<5",
        "tensorboard>=2.21,<2.22",
        "absl-py>=2.1,<3",
        "ml-collections>=1.1,<2",
        "sentencepiece>=0.2,<0.3",
        "sacrebleu>=2.6,<3",
        "babel>=2.14,<3",
        "num2words>=0.5.13,<0.6",
        "matplotlib>=3.8,<4",
        "numpy>=1.26",
        "importlib_resources>=6",  # tensorflow-datasets needs it to prepare builders; etils 1.15 no longer pulls it in
    ],
    extras_require={
        # nmt-prepare --runner=direct|DataflowRunner|...: prepare on Apache Beam workers.
        "beam": ["apache-beam>=2.77,<3"],
        # The Beam tests run in CI too (tests/test_prepare_beam.py), never skipped.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5,<4",
                 "apache-beam>=2.77,<3"],
    },
    entry_points={
        "console_scripts": [
            "nmt-train=trainer.main:run_train",
            "nmt-eval=trainer.main:run_eval",
            "nmt-translate=trainer.main:run_translate",
            "nmt-export=trainer.main:run_export",
            "nmt-bench=trainer.main:run_bench",
            "nmt-prepare=trainer.main:run_prepare",
            "nmt-score=trainer.main:run_score",
        ],
    },
)
