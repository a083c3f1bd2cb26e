"""The bundled demo: a tiny key-value lookup model with two SAEs, and the paper's perturbation study on it."""
