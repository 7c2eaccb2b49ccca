"""Spark's Python daemon with the scorer's custom architectures registered first.

Set as `spark.python.daemon.module`: Spark starts it once per executor and forks every Python worker
from it, so a config registered here (from PLANTMIX_OPEN_CLIP_CONFIGS) is known to each worker that
runs clip-retrieval's inference. Otherwise it is pyspark's own daemon.
"""

from plantmix.embed.workers import register_from_env

register_from_env()

if __name__ == "__main__":  # multiprocessing's spawn re-imports this module in workers' children
    from pyspark.daemon import manager

    manager()
