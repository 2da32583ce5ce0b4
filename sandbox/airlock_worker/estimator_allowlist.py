"""Everything the estimator policy loader (:mod:`.policy_loader`) may hand to a pickle, and why.

A pickle can only do harm through the globals it names: the pickle VM calls what
``find_class`` returns (REDUCE, NEWOBJ, INST, OBJ) with arguments the pickle chose, and sets
state on what it built (BUILD). So every entry here is either

- a **class** that is data: building it with any arguments and setting any state runs only
  the class's own code, which stores, copies or checks what it is given and never imports,
  evaluates, opens, or calls something it was handed except other entries of this list; or
- a **reconstruction function** of the same kind, named by the library's own ``__reduce__``.

Nothing else is reachable: no ``eval``/``exec``/``compile``/``__import__``, no ``getattr``-
style indirection (``operator.attrgetter``, ``functools.partial``, numpy's
``_ufunc_reconstruct``, which imports a module named by the pickle), no module objects, no
function that loads files. The rule is checked, not trusted: tests/unit/test_estimator_
allowlist.py resolves every entry in the image's library versions and refuses a function
that is not declared a reconstruction function, a class that is a metaclass, module or
function type, and any Python code reachable from the pickle VM that names a code-running
builtin. Native (C/Cython) entries cannot be read that way; each group of them says here what
it does with its arguments.

Names are ``module:qualname`` as the library's pickles write them (``pickle.whichmodule``:
where the class is defined). A library upgrade that moves a class refuses its pickles until
the entry is moved too; ``scripts/gen-estimator-classes.py`` regenerates the estimator list.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .estimator_classes import ESTIMATOR_CLASSES


class Kind(enum.StrEnum):
    CLASS = "class"
    #: A function the pickle may call, named by a library's ``__reduce__``.
    RECONSTRUCTOR = "reconstructor"


@dataclass(frozen=True)
class Group:
    """Entries allowed for one reason."""

    why: str
    kind: Kind
    names: tuple[str, ...]
    #: Implemented in C or Cython: ``why`` says what it does with its arguments, since the
    #: test cannot read its code.
    native: bool = False


def _latin1_encode(text: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it for ``bytes`` (``encode(text,
    'latin1')``); any other codec (``zlib``, ``rot13``, a name imported from ``encodings``)
    is refused rather than looked up."""
    if (type(text) is not str or encoding not in ("latin1", "latin-1")
            or errors != "strict"):
        raise ValueError("_codecs.encode is allowed only as pickle uses it: str, 'latin1'")
    return text.encode("latin1")


#: Entries handed out as a substitute with the same behaviour on what pickles write.
SUBSTITUTES: dict[str, Any] = {"_codecs:encode": _latin1_encode}

#: numpy 1.x pickles name ``numpy.core``, which numpy 2 renamed ``numpy._core`` (numpy's own
#: unpickling maps it the same way).
MODULE_ALIASES: dict[str, str] = {
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
    "numpy.core.records": "numpy._core.records",
}

ALLOWLIST: tuple[Group, ...] = (
    Group(
        why="Estimators of the scikit-learn API (scikit-learn's own, XGBoost's and "
            "LightGBM's wrappers): ``__init__`` stores its keyword parameters, "
            "``__setstate__`` (BaseEstimator's, XGBModel's, LGBMModel's) copies the state "
            "into ``__dict__`` after checking versions. A parameter that is code (a "
            "callable) can only be another entry here.",
        kind=Kind.CLASS, names=ESTIMATOR_CLASSES),
    Group(
        why="numpy arrays, dtypes and scalar types: ndarray's ``__setstate__`` copies "
            "bytes (or, for object arrays, objects this same loader built) into a new "
            "buffer of the declared shape and dtype, checking sizes (the loader refuses "
            "``ndarray(shape, dtype, buffer)``, which takes a buffer's bytes for pointers, "
            "and a dtype state numpy's constructor would not make: policy_loader.py); "
            "``_reconstruct`` is ``ndarray.__new__`` for a subclass of ndarray; ``scalar`` "
            "builds a scalar from "
            "a dtype and its bytes.",
        kind=Kind.CLASS, native=True,
        names=("numpy:ndarray", "numpy:dtype", "numpy:bool", "numpy:bool_", "numpy:int8",
               "numpy:int16", "numpy:int32", "numpy:int64", "numpy:uint8", "numpy:uint16",
               "numpy:uint32", "numpy:uint64", "numpy:float16", "numpy:float32",
               "numpy:float64", "numpy:complex64", "numpy:complex128", "numpy:str_",
               "numpy:bytes_", "numpy:object_")),
    Group(
        why="numpy's array reconstruction functions, as ndarray's ``__reduce__`` names "
            "them: ``_reconstruct(subtype, shape, dtype)`` allocates an empty array, "
            "``scalar(dtype, data)`` reads a scalar.",
        kind=Kind.RECONSTRUCTOR, native=True,
        names=("numpy._core.multiarray:_reconstruct", "numpy._core.multiarray:scalar")),
    Group(
        why="numpy's buffer-protocol reconstruction (pickle protocol 5): "
            "``frombuffer(buf, dtype).reshape(shape, order)``.",
        kind=Kind.RECONSTRUCTOR, names=("numpy._core.numeric:_frombuffer",)),
    Group(
        why="Masked arrays (GridSearchCV's ``cv_results_``): a data array and a mask, "
            "rebuilt by ``_mareconstruct(subtype, baseclass, baseshape, basetype)``, which "
            "calls ``ndarray.__new__`` on the classes it is given.",
        kind=Kind.CLASS, names=("numpy.ma:MaskedArray",)),
    Group(
        why="See the class above: it builds an empty masked array.",
        kind=Kind.RECONSTRUCTOR, names=("numpy.ma.core:_mareconstruct",)),
    Group(
        why="numpy random generators (an estimator's ``random_state``): bit generators "
            "take their state as integers; SeedSequence its entropy.",
        kind=Kind.CLASS, native=True,
        names=("numpy.random.mtrand:RandomState", "numpy.random._generator:Generator",
               "numpy.random._mt19937:MT19937", "numpy.random._pcg64:PCG64",
               "numpy.random._pcg64:PCG64DXSM", "numpy.random._philox:Philox",
               "numpy.random._sfc64:SFC64", "numpy.random.bit_generator:SeedSequence")),
    Group(
        why="numpy's generator reconstruction: ``__bit_generator_ctor(name)`` looks the "
            "name up in numpy's own table of bit generators (or calls a class from this "
            "list with no argument); ``__randomstate_ctor`` and ``__generator_ctor`` pass a "
            "bit generator to RandomState / Generator; ``__pyx_unpickle_SeedSequence`` is "
            "Cython's checksum-checked ``__setstate__``.",
        kind=Kind.RECONSTRUCTOR,
        names=("numpy.random._pickle:__bit_generator_ctor",
               "numpy.random._pickle:__randomstate_ctor",
               "numpy.random._pickle:__generator_ctor",
               "numpy.random.bit_generator:__pyx_unpickle_SeedSequence")),
    Group(
        why="numpy reductions used as estimator parameters (FeatureAgglomeration's "
            "``pooling_func``): numeric functions of their arguments.",
        kind=Kind.RECONSTRUCTOR, native=True, names=("numpy:mean", "numpy:median")),
    Group(
        why="joblib's array records: a NumpyArrayWrapper holds shape, dtype and order; "
            "joblib's unpickler reads the array's bytes from the stream that follows "
            "(object arrays through this same loader's find_class).",
        kind=Kind.CLASS, names=("joblib.numpy_pickle:NumpyArrayWrapper",)),
    Group(
        why="scipy sparse matrices and B-splines (SplineTransformer): built from arrays, "
            "checked for consistent shapes (a sparse matrix's BUILD checks nothing: the "
            "loader makes it again from copies of its arrays and checks every index, "
            "policy_loader.py).",
        kind=Kind.CLASS,
        names=("scipy.sparse._csr:csr_matrix", "scipy.sparse._csc:csc_matrix",
               "scipy.sparse._coo:coo_matrix", "scipy.sparse._csr:csr_array",
               "scipy.sparse._csc:csc_array", "scipy.interpolate._bsplines:BSpline")),
    Group(
        why="scikit-learn's fitted trees, neighbour trees and distance metrics (Cython): "
            "``__setstate__`` copies node and data arrays after checking their dtype and "
            "shape; ``newObj(cls)`` is ``cls.__new__(cls)``.",
        kind=Kind.CLASS, native=True,
        names=("sklearn.tree._tree:Tree", "sklearn.neighbors._kd_tree:KDTree",
               "sklearn.neighbors._ball_tree:BallTree",
               *(f"sklearn.metrics._dist_metrics:{m}{bits}"
                 for m in ("EuclideanDistance", "SEuclideanDistance", "ManhattanDistance",
                           "ChebyshevDistance", "MinkowskiDistance", "MahalanobisDistance",
                           "HammingDistance", "CanberraDistance", "BrayCurtisDistance",
                           "JaccardDistance", "MatchingDistance", "DiceDistance",
                           "KulsinskiDistance", "RogersTanimotoDistance",
                           "RussellRaoDistance", "SokalMichenerDistance",
                           "SokalSneathDistance", "HaversineDistance")
                 for bits in ("64", "32")))),
    Group(
        why="See the classes above: ``newObj(cls)`` is ``cls.__new__(cls)``.",
        kind=Kind.RECONSTRUCTOR, native=True,
        names=("sklearn.metrics._dist_metrics:newObj", "sklearn.neighbors._kd_tree:newObj",
               "sklearn.neighbors._ball_tree:newObj")),
    Group(
        why="scikit-learn's loss functions, links and SGD losses (gradient boosting, "
            "GLMs, SGD, MLP): parameters and intervals only; the Cython ones keep numbers.",
        kind=Kind.CLASS, native=True,
        names=(*(f"sklearn._loss.loss:{n}" for n in (
                    "HalfSquaredError", "AbsoluteError", "PinballLoss", "HuberLoss",
                    "HalfPoissonLoss", "HalfGammaLoss", "HalfTweedieLoss",
                    "HalfTweedieLossIdentity", "HalfBinomialLoss",
                    "HalfMultinomialLoss", "ExponentialLoss")),
               *(f"sklearn._loss.link:{n}" for n in (
                    "IdentityLink", "LogLink", "LogitLink", "HalfLogitLink",
                    "MultinomialLogit", "Interval")),
               *(f"sklearn._loss._loss:Cy{n}" for n in (
                    "HalfSquaredError", "AbsoluteError", "PinballLoss", "HuberLoss",
                    "HalfPoissonLoss", "HalfGammaLoss", "HalfTweedieLoss",
                    "HalfTweedieLossIdentity", "HalfBinomialLoss", "ExponentialLoss",
                    "HalfMultinomialLoss")),
               *(f"sklearn.linear_model._sgd_fast:{n}" for n in (
                    "Hinge", "SquaredHinge", "ModifiedHuber", "EpsilonInsensitive",
                    "SquaredEpsilonInsensitive")))),
    Group(
        why="Fitted parts of scikit-learn estimators that are not estimators themselves: "
            "histogram gradient boosting's tree predictors, calibrated classifiers, "
            "Birch's CF tree, bisecting k-means' tree, MLP optimizers, Gaussian-process "
            "kernels, cross-validation splitters, scorers and Bunch (a dict): each stores "
            "the arrays and numbers it is given.",
        kind=Kind.CLASS,
        names=("sklearn.ensemble._hist_gradient_boosting.predictor:TreePredictor",
               "sklearn.calibration:_CalibratedClassifier",
               "sklearn.cluster._birch:_CFNode", "sklearn.cluster._birch:_CFSubcluster",
               "sklearn.cluster._bisect_k_means:_BisectingTree",
               "sklearn.neural_network._stochastic_optimizers:AdamOptimizer",
               "sklearn.neural_network._stochastic_optimizers:SGDOptimizer",
               *(f"sklearn.gaussian_process.kernels:{n}" for n in (
                    "ConstantKernel", "WhiteKernel", "RBF", "Matern", "RationalQuadratic",
                    "ExpSineSquared", "DotProduct", "PairwiseKernel", "Sum", "Product",
                    "Exponentiation", "CompoundKernel", "Hyperparameter")),
               *(f"sklearn.model_selection._split:{n}" for n in (
                    "KFold", "StratifiedKFold", "GroupKFold", "StratifiedGroupKFold",
                    "ShuffleSplit", "StratifiedShuffleSplit", "GroupShuffleSplit",
                    "RepeatedKFold", "RepeatedStratifiedKFold", "TimeSeriesSplit",
                    "LeaveOneOut", "LeavePOut", "PredefinedSplit", "_CVIterableWrapper")),
               "sklearn.metrics._scorer:_PassthroughScorer",
               "sklearn.utils._bunch:Bunch")),
    Group(
        why="Default score and algorithm functions that estimators store as parameters "
            "(SelectKBest's ``score_func``, BisectingKMeans' Lloyd/Elkan steps): numeric "
            "functions of arrays.",
        kind=Kind.RECONSTRUCTOR,
        names=("sklearn.feature_selection._univariate_selection:f_classif",
               "sklearn.feature_selection._univariate_selection:f_regression",
               "sklearn.feature_selection._univariate_selection:r_regression",
               "sklearn.feature_selection._univariate_selection:chi2",
               "sklearn.feature_selection._mutual_info:mutual_info_classif",
               "sklearn.feature_selection._mutual_info:mutual_info_regression",
               "sklearn.cluster._kmeans:_kmeans_single_lloyd",
               "sklearn.cluster._kmeans:_kmeans_single_elkan")),
    Group(
        why="scipy's array-API ``asarray`` (BSpline keeps its array namespace's, so "
            "SplineTransformer pickles name it): ``numpy.array(obj, dtype=, copy=)``.",
        kind=Kind.RECONSTRUCTOR, names=("scipy._lib.array_api_compat.numpy._aliases:asarray",)),
    Group(
        why="Booster state of the XGBoost and LightGBM wrappers: ``__setstate__`` hands the "
            "saved model (bytes / text) to the library's own parser, which reads it as "
            "data. (``__init__``'s ``model_file`` can make it read a file inside the "
            "sandbox, which holds nothing but the artifact.)",
        kind=Kind.CLASS, native=True,
        names=("xgboost.core:Booster", "lightgbm.basic:Booster")),
    Group(
        why="Python's own containers and values, as pickles of any protocol name them.",
        kind=Kind.CLASS, native=True,
        names=("builtins:object", "builtins:bytes", "builtins:bytearray", "builtins:slice",
               "builtins:set", "builtins:frozenset", "builtins:complex", "builtins:range",
               "collections:OrderedDict", "collections:defaultdict")),
    Group(
        why="Protocol 0 and 1 rebuild plain objects with ``copyreg._reconstructor(cls, "
            "base, state)``: ``base.__new__(cls, state)`` on classes of this list.",
        kind=Kind.RECONSTRUCTOR, names=("copyreg:_reconstructor",)),
    Group(
        why="Protocol 2 writes ``bytes`` as ``_codecs.encode(text, 'latin1')``; handed out "
            "as a substitute that accepts exactly that (SUBSTITUTES).",
        kind=Kind.RECONSTRUCTOR, names=("_codecs:encode",)),
)


def entries() -> dict[str, Group]:
    """``module:qualname`` -> its group (each name once: a test checks it)."""
    return {name: group for group in ALLOWLIST for name in group.names}
