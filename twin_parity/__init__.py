"""The parity proof as a library: the harnesses that run each check (forward, training, generation,
GPT-2, sharded), the pitfall and bf16 demonstrations, the golden vectors, and what the test files
share. ``scripts.parity_report`` and the tests in parity_tests/ import it; it imports neither."""
