from .base import AbstractAdditiveFactorization as AbstractAdditiveFactorization
from .base import AbstractBlockFactorization as AbstractBlockFactorization
from .base import AbstractFactorization as AbstractFactorization
from .cp import CP as CP
from .matrix import DeepMatrix as DeepMatrix
from .htf import HTF as HTF
from .htf import ModeTree as ModeTree
from .diagonal import DiagonalNet as DiagonalNet
