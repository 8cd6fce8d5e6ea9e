// Reference for the gradient of mean-field inference: Philipp Krähenbühl's own DenseCRF::gradient (densecrf 2.2,
// as shipped inside the pydensecrf2 1.1 sdist), behind a small C entry point for ctypes.
//
// Nothing of Krähenbühl's code is copied here: tests/krahenbuhl_reference.py compiles this file together with the
// sdist's src/{densecrf,unary,pairwise,permutohedral,objective,labelcompatibility}.cpp against its include/ (and
// its bundled Eigen) into a shared library, cached per user; and a second one, "fixed", whose permutohedral.cpp
// has the argument order of Permutohedral::gradient corrected (see _FIX there), for kernel gradients.
//
// Two small classes adapt the library to a vector-Jacobian product:
// - ParamUnary: the unary energies ARE the parameters, so gradient(b) is b itself and unary_grad comes out as
//   dObjective/dUnary (ConstUnaryEnergy has no parameters; LogisticUnaryEnergy with an identity feature matrix
//   would cost N^2).
// - WeightedSum: objective = sum(G .* Q_final); the library wants d_mul_Q = Q .* dObjective/dQ = G .* Q.
#include "densecrf.h"
#include "permutohedral.h"

#include <cstdio>
#include <exception>
#include <vector>

namespace {

typedef Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> RowMatrixXf;

class ParamUnary : public UnaryEnergy {
	MatrixXf unary_;

public:
	explicit ParamUnary(const MatrixXf& u) : unary_(u) {}
	MatrixXf get() const override { return unary_; }
	VectorXf parameters() const override { return Map<const VectorXf>(unary_.data(), unary_.size()); }
	void setParameters(const VectorXf& v) override {
		unary_ = Map<const MatrixXf>(v.data(), unary_.rows(), unary_.cols());
	}
	VectorXf gradient(const MatrixXf& b) const override { return Map<const VectorXf>(b.data(), b.size()); }
};

class WeightedSum : public ObjectiveFunction {
	MatrixXf g_;

public:
	explicit WeightedSum(const MatrixXf& g) : g_(g) {}
	double evaluate(MatrixXf& d_mul_Q, const MatrixXf& Q) const override {
		d_mul_Q = g_.array() * Q.array();
		double r = 0;
		for (int i = 0; i < Q.cols(); i++)
			for (int l = 0; l < Q.rows(); l++)
				r += double(g_(l, i)) * double(Q(l, i));
		return r;
	}
};

}  // namespace

extern "C" {

// Arrays are C-order (row-major) float32 as numpy gives them:
//   unary, grad_output, q_out, unary_grad_out: [L, N]
//   features: the terms' [D_k, N] blocks, one after the other
//   compat_kind[k]: 0 Potts (1 value), 1 diagonal (L values), 2 matrix (L*L values, row-major); compat: their values,
//   one term after the other; normalization[k]: pydensecrf's NormalizationType (0 none, 1 before, 2 after, 3 sym).
//   compat_grad_out: Krähenbühl's parameter gradient per term, concatenated (Potts 1, diagonal L, matrix
//   L(L+1)/2: the upper triangle row by row); kernel_grad_out (may be NULL): D_k values per term, concatenated.
// Returns 0, or -1 with a message in err (err_len bytes) on failure.
int krahenbuhl_gradient(int N, int L, int n_terms, const int* dims, const float* features, const int* compat_kind,
                        const float* compat, const int* normalization, int iterations, const float* unary,
                        const float* grad_output, float* q_out, double* objective_out, float* unary_grad_out,
                        float* compat_grad_out, float* kernel_grad_out, char* err, int err_len) {
	try {
		DenseCRF crf(N, L);
		crf.setUnaryEnergy(new ParamUnary(Map<const RowMatrixXf>(unary, L, N)));
		const float* f = features;
		const float* c = compat;
		for (int k = 0; k < n_terms; k++) {
			MatrixXf feat = Map<const RowMatrixXf>(f, dims[k], N);
			f += size_t(dims[k]) * N;
			LabelCompatibility* lc;
			if (compat_kind[k] == 0) {
				lc = new PottsCompatibility(c[0]);
				c += 1;
			} else if (compat_kind[k] == 1) {
				lc = new DiagonalCompatibility(Map<const VectorXf>(c, L));
				c += L;
			} else {
				lc = new MatrixCompatibility(Map<const RowMatrixXf>(c, L, L));
				c += size_t(L) * L;
			}
			crf.addPairwiseEnergy(feat, lc, DIAG_KERNEL, NormalizationType(normalization[k]));
		}
		WeightedSum objective(Map<const RowMatrixXf>(grad_output, L, N));
		VectorXf unary_grad, lbl_cmp_grad, kernel_grad;
		*objective_out = crf.gradient(iterations, objective, &unary_grad, &lbl_cmp_grad,
		                              kernel_grad_out ? &kernel_grad : NULL);

		// The final marginals: the same mean-field as gradient() runs (inference() is the identical loop).
		Map<RowMatrixXf>(q_out, L, N) = crf.inference(iterations);
		Map<RowMatrixXf>(unary_grad_out, L, N) = Map<const MatrixXf>(unary_grad.data(), L, N);
		Map<VectorXf>(compat_grad_out, lbl_cmp_grad.size()) = lbl_cmp_grad;
		if (kernel_grad_out)
			Map<VectorXf>(kernel_grad_out, kernel_grad.size()) = kernel_grad;
		return 0;
	} catch (const std::exception& e) {
		if (err && err_len > 0) {
			std::snprintf(err, err_len, "%s", e.what());
		}
		return -1;
	}
}

// The bare permutohedral lattice (no normalisation): value = a^T K b with K the lattice filter of features
// [D, N], and df [D, N] = Permutohedral::gradient, Krähenbühl's d(a^T K b)/d features. a, b: [V, N].
int krahenbuhl_lattice_gradient(int N, int D, int V, const float* features, const float* a, const float* b,
                                double* value_out, float* df_out) {
	Permutohedral lattice;
	lattice.init(Map<const RowMatrixXf>(features, D, N));
	MatrixXf A = Map<const RowMatrixXf>(a, V, N), B = Map<const RowMatrixXf>(b, V, N);
	MatrixXf KB = lattice.compute(B);
	double r = 0;
	for (int i = 0; i < N; i++)
		for (int v = 0; v < V; v++)
			r += double(A(v, i)) * double(KB(v, i));
	*value_out = r;
	MatrixXf df(D, N);
	lattice.gradient(df.data(), A.data(), B.data(), V);
	Map<RowMatrixXf>(df_out, D, N) = df;
	return 0;
}

}  // extern "C"
