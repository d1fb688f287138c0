"""The IR audit finds reveals: on hand-written pphlo lines and on a compiled executable."""

import numpy as np

from cipherdm_spu import Public, ops
from cipherdm_spu.ir_audit import declassifications

SECRET_TO_PUBLIC = "%3 = pphlo.convert %2 : (tensor<4x!pphlo.secret<f32>>) -> tensor<4xf32>"
PUBLIC_TO_SECRET = "%2 = pphlo.convert %0 : (tensor<f32>) -> tensor<!pphlo.secret<f32>>"


def test_secret_to_public_conversion_is_found():
    assert declassifications(SECRET_TO_PUBLIC) == [SECRET_TO_PUBLIC]
    assert declassifications(PUBLIC_TO_SECRET) == []


def test_public_outputs_of_main_are_found():
    ir = "func.func @main(%arg0: tensor<3x!pphlo.secret<f32>>) -> (tensor<3x!pphlo.secret<f32>>, tensor<3xf32>) {"
    assert declassifications(ir) == ["public output tensor<3xf32>"]


def test_compiled_secret_computation_reveals_nothing(sessions):
    compiled = sessions["cipherdm"].compile(lambda x, c: ops.softmax(x * c) + ops.silu(x),
                                            np.ones((2, 3), np.float32), Public(np.ones(3, np.float32)))
    assert "pphlo" in compiled.mlir
    assert declassifications(compiled.mlir) == []
