from .base import AbstractAdditiveFactorization as AbstractAdditiveFactorization
from .base import AbstractFactorization as AbstractFactorization
from .cp import CP as CP
from .matrix import DeepMatrix as DeepMatrix
