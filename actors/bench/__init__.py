"""Benchmarks and the chaos run, kept out of the library modules (`meshpipe bench ...`, `meshpipe chaos`).

pipeline: single process vs pipeline, Ray hops; serve: the HTTP app; chaos: stage kills under load;
placement: the layer placement DP vs brute force; planner: route planning time vs size; gpu: one GPU
shared by S stage actors vs one process. cli: the `meshpipe bench` sub-app.
"""
