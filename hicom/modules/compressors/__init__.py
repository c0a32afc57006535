from hicom.modules.compressors.avgpool import AvgPoolCompressor
from hicom.modules.compressors.base import Compressor, PackedLayout
from hicom.modules.compressors.bilinear import BilinearPoolCompressor
from hicom.modules.compressors.global_compressor import GlobalCompressor, Position
from hicom.modules.compressors.hicom import HICom
from hicom.modules.compressors.injection import Guide, GuideInjector
from hicom.modules.compressors.local import Adapt, ClipNorm, Keys, LocalCompressor
from hicom.modules.compressors.qformer import QFormerCompressor

__all__ = [
    "Adapt",
    "AvgPoolCompressor",
    "BilinearPoolCompressor",
    "ClipNorm",
    "Compressor",
    "GlobalCompressor",
    "Guide",
    "GuideInjector",
    "HICom",
    "Keys",
    "LocalCompressor",
    "PackedLayout",
    "Position",
    "QFormerCompressor",
]
