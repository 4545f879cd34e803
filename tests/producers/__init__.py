"""ckptscope against files written by the real producers (transformers, peft, Lightning, diffusers,
plain torch), through its three faces (library, CLI, REST), each compared with the producer's own
loader. The fixtures (tiny random-init models built from configs, offline) are in conftest.py."""
