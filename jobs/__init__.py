"""The jobs the CLI runs, callable from Python with the same arguments: extract a vector, run
the steered generation (with classification and report), benchmark. Each starts engines through
driver/launch.py."""
