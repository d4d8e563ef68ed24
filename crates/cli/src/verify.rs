//! `ferry verify`: run a model on a golden file's inputs and compare.

use crate::VerifyArgs;

pub fn verify(a: &VerifyArgs) -> Result<(), String> {
    let golden = ferry_verifier::Golden::load(&a.golden).map_err(|e| e.to_string())?;
    let mut model = ferry_verifier::Model::load(&a.model, 2).map_err(|e| e.to_string())?;
    let reports = ferry_verifier::compare(&mut model, &golden).map_err(|e| e.to_string())?;
    let mut worst = 0.0f64;
    for r in &reports {
        crate::common::outln(format!(
            "{:<20} {:<16} max-abs {:.3e}",
            r.name,
            format!("{:?}", r.shape),
            r.max_abs
        ));
        worst = worst.max(r.max_abs);
    }
    if worst > a.atol {
        return Err(format!(
            "{}: max-abs {worst:.3e} exceeds {:.1e}",
            a.model.display(),
            a.atol
        ));
    }
    Ok(())
}
