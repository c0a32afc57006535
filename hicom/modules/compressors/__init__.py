from hicom.modules.compressors.avgpool import AvgPoolCompressor
from hicom.modules.compressors.base import Compressor
from hicom.modules.compressors.global_compressor import GlobalCompressor
from hicom.modules.compressors.hicom import HICom
from hicom.modules.compressors.injection import Guide, GuideInjector
from hicom.modules.compressors.local import LocalCompressor

__all__ = [
    "AvgPoolCompressor",
    "Compressor",
    "GlobalCompressor",
    "Guide",
    "GuideInjector",
    "HICom",
    "LocalCompressor",
]
