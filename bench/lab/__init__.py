"""The lab notebook: one-off measurements that answered a past question. See bench/lab/README.md; what a user runs to
compare liger-fx with the alternatives is `python -m bench.run`."""
