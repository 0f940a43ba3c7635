"""Write fhir_fixtures/: one small FHIR R4 Bundle per clinical scenario, and what each must show.

Run from the repository root: `python scripts/build_fixtures.py`. The bundles are committed;
this script is how they were made and how to change them consistently. Every scenario starts
from one eligible patient ("the base": a pancreatic NET, grade 2 by Ki-67, with liver
metastases and recent normal labs, a candidate for both trials on 2026-11-01) and changes only
what the scenario is about. `expected` lists the criterion results and trial statuses the
scenario exists to show; tests/test_fixture_scenarios.py checks them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fhir_fixtures"
AS_OF = "2026-11-01"
A, B = "NCT04339036", "NCT05610826"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NDC = "http://hl7.org/fhir/sid/ndc"
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


class Patient:
    """A patient's resources under construction, with stable ids derived from the scenario."""

    def __init__(self, key: str, *, gender: str = "male", birth: str | None = "1968-05-14"):
        self.key = key
        self.pid = key
        self.resources: list[dict[str, Any]] = []
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.pid,
            "name": [{"family": "Fixture", "given": [key]}],
            "gender": gender,
        }
        if birth:
            patient["birthDate"] = birth
        self.patient = patient
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{self.key}-{prefix}{self._n}"

    def _subject(self) -> dict[str, str]:
        return {"reference": f"Patient/{self.pid}"}

    def condition(
        self,
        codings: list[tuple[str, str, str]],
        onset: str,
        *,
        clinical: str | None = "active",
        verification: str | None = "confirmed",
        rid: str | None = None,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {
            "resourceType": "Condition",
            "id": rid or self._id("cond"),
            "subject": self._subject(),
            "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]},
            "onsetDateTime": onset,
        }
        if clinical:
            r["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": clinical}]}
        if verification:
            r["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": verification}]}
        self.resources.append(r)
        return r

    def lab(
        self,
        code: str,
        display: str,
        value: float | None,
        unit: str | None,
        when: str,
        *,
        high: float | None = None,
        low: float | None = None,
        status: str = "final",
        ucum: bool = True,
        rid: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {
            "resourceType": "Observation",
            "id": rid or self._id("obs"),
            "status": status,
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": self._subject(),
            "effectiveDateTime": when,
        }
        if value is not None:
            q: dict[str, Any] = {"value": value}
            if unit is not None:
                q["unit"] = unit
                if ucum:
                    q.update(system=UCUM, code=unit)
            r["valueQuantity"] = q
        if high is not None or low is not None:
            rr: dict[str, Any] = {}
            if low is not None:
                rr["low"] = {"value": low, "unit": unit, "system": UCUM, "code": unit}
            if high is not None:
                rr["high"] = {"value": high, "unit": unit, "system": UCUM, "code": unit}
            r["referenceRange"] = [rr]
        r.update(extra)
        self.resources.append(r)
        return r

    def coded_obs(
        self, code: str, display: str, value: tuple[str, str, str], when: str, status: str = "final"
    ) -> dict[str, Any]:
        r: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self._id("obs"),
            "status": status,
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": self._subject(),
            "effectiveDateTime": when,
            "valueCodeableConcept": {
                "coding": [{"system": value[0], "code": value[1], "display": value[2]}]
            },
        }
        self.resources.append(r)
        return r

    def snomed_obs(
        self, code: str, display: str, when: str, *, value: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """An Observation coded with a SNOMED CT finding or observable (a NYHA class finding,
        a mitotic count), with ``value`` merged in (e.g. ``{"valueQuantity": ...}``)."""
        r: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self._id("obs"),
            "status": "final",
            "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
            "subject": self._subject(),
            "effectiveDateTime": when,
        }
        r.update(value or {})
        self.resources.append(r)
        return r

    def procedure(
        self, codings: list[tuple[str, str, str]], when: str, *, status: str = "completed"
    ) -> dict[str, Any]:
        r = {
            "resourceType": "Procedure",
            "id": self._id("proc"),
            "status": status,
            "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]},
            "subject": self._subject(),
            "performedDateTime": when,
        }
        self.resources.append(r)
        return r

    def med_admin(
        self, rxcui: str, display: str, when: str, *, status: str = "completed"
    ) -> dict[str, Any]:
        r = {
            "resourceType": "MedicationAdministration",
            "id": self._id("medadmin"),
            "status": status,
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": rxcui, "display": display}]
            },
            "subject": self._subject(),
            "effectiveDateTime": when,
        }
        self.resources.append(r)
        return r

    def med_statement(
        self, rxcui: str, display: str, start: str, *, status: str = "active"
    ) -> dict[str, Any]:
        r = {
            "resourceType": "MedicationStatement",
            "id": self._id("medstmt"),
            "status": status,
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": rxcui, "display": display}]
            },
            "subject": self._subject(),
            "effectivePeriod": {"start": start},
        }
        self.resources.append(r)
        return r

    def remove(self, resource: dict[str, Any]) -> None:
        self.resources.remove(resource)

    def bundle(self, bundle_type: str = "collection") -> dict[str, Any]:
        entries = [{"fullUrl": f"Patient/{self.pid}", "resource": self.patient}]
        entries += [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in self.resources
        ]
        return {
            "resourceType": "Bundle",
            "id": f"fixture-{self.key}",
            "type": bundle_type,
            "entry": entries,
        }


# --- the base: eligible for both trials on 2026-11-01 -----------------------------------

PNET = [
    (ICD10, "C25.4", "Malignant neoplasm of endocrine pancreas"),
    (SNOMED, "735735001", "Primary malignant neuroendocrine neoplasm of pancreas (disorder)"),
]
LIVER_METS = [(ICD10, "C7B.02", "Secondary carcinoid tumors of liver")]
ILEAL_NET = [(ICD10, "C7A.012", "Malignant carcinoid tumor of the ileum")]
LIVER_SECONDARY = [
    (ICD10, "C78.7", "Secondary malignant neoplasm of liver and intrahepatic bile duct")
]
LAB_DAY = "2026-10-20"


def base(key: str, **kw: Any) -> tuple[Patient, dict[str, dict[str, Any]]]:
    """The eligible base patient; returns the patient and its resources by role."""
    p = Patient(key, **kw)
    r: dict[str, dict[str, Any]] = {}
    r["pnet"] = p.condition(PNET, "2025-11-03")
    r["liver"] = p.condition(LIVER_METS, "2025-11-03")
    r["ki67"] = p.lab("29593-1", "Ki-67 index", 8, "%", "2025-11-10")
    r["bili"] = p.lab("1975-2", "Bilirubin.total", 0.8, "mg/dL", LAB_DAY, high=1.2, low=0.1)
    r["alt"] = p.lab("1742-6", "ALT", 35, "U/L", LAB_DAY, high=40, low=7)
    r["ast"] = p.lab("1920-8", "AST", 30, "U/L", LAB_DAY, high=40, low=10)
    r["alb"] = p.lab("1751-7", "Albumin", 4.0, "g/dL", LAB_DAY, high=5.0, low=3.5)
    r["plt"] = p.lab("777-3", "Platelets", 210, "10*3/uL", LAB_DAY, high=400, low=150)
    r["creat"] = p.lab("2160-0", "Creatinine", 0.9, "mg/dL", LAB_DAY, high=1.3, low=0.7)
    r["inr"] = p.lab("6301-6", "INR", 1.0, "{INR}", LAB_DAY, high=1.1, low=0.9)
    r["pt"] = p.lab("5902-2", "Prothrombin time", 12.0, "s", LAB_DAY, high=13.5, low=11.0)
    r["hb"] = p.lab("718-7", "Hemoglobin", 13.5, "g/dL", LAB_DAY, high=17.5, low=13.0)
    r["wbc"] = p.lab("6690-2", "Leukocytes", 6.2, "10*3/uL", LAB_DAY, high=11.0, low=4.0)
    r["weight"] = p.lab("29463-7", "Body weight", 80, "kg", LAB_DAY)
    r["ecog"] = p.coded_obs(
        "89247-1",
        "ECOG performance status",
        (LOINC, "LA9623-5", "Restricted in physically strenuous activity"),
        "2026-10-25",
    )
    return p, r


SCENARIOS: list[dict[str, Any]] = []


def scenario(
    key: str,
    about: str,
    patient: Patient,
    expected: dict[str, Any],
    bundle_type: str = "collection",
    bundle: dict[str, Any] | None = None,
) -> None:
    SCENARIOS.append(
        {
            "key": key,
            "about": about,
            "expected": expected,
            "bundle": bundle or patient.bundle(bundle_type),
        }
    )


def build() -> None:  # noqa: PLR0915 - one scenario after another, deliberately flat
    p, _ = base("both-candidate")
    scenario(
        "both-candidate",
        "pancreatic NET G2 (Ki-67 8 %) with liver metastases, normal "
        "recent labs: a candidate for both trials",
        p,
        {
            A: {
                "status": "candidate",
                "inc-net-diagnosis": "pass",
                "inc-grade-2": "pass",
                "inc-liver-metastases": "pass",
                "inc-age": "pass",
                "inc-ecog": "pass",
                "inc-bilirubin": "pass",
                "inc-alt": "pass",
                "inc-ast": "pass",
                "inc-albumin": "pass",
                "inc-platelets": "pass",
                "inc-creatinine": "pass",
                "inc-inr": "pass",
                "inc-washout": "pass",
                "exc-prior-liver-embolization": "pass",
                "exc-biliary-intervention": "pass",
                "exc-pregnancy": "pass",
                "inc-portal-vein": "manual",
            },
            B: {
                "status": "candidate",
                "inc-pancreatic-net": "pass",
                "inc-liver-metastases": "pass",
                "inc-grade-1-2": "pass",
                "inc-age": "pass",
                "inc-chemotherapy-washout": "pass",
                "exc-grade-3": "pass",
                "exc-prior-liver-directed-therapy": "pass",
                "exc-prior-capecitabine-temozolomide": "pass",
                "exc-bilirubin": "pass",
                "exc-inr": "pass",
                "exc-albumin": "pass",
                "exc-cirrhosis": "pass",
                "exc-ascites": "pass",
                "exc-renal-function": "pass",
                "exc-hemoglobin": "pass",
                "exc-wbc": "pass",
                "exc-platelets": "pass",
                "exc-brain-metastases": "pass",
                "exc-heart-failure": "pass",
                "exc-uncontrolled-diabetes": "pass",
                "exc-pregnancy": "pass",
                "exc-urinary-incontinence": "pass",
            },
        },
    )

    p, r = base("non-net")
    p.remove(r["pnet"])
    p.remove(r["liver"])
    p.remove(r["ki67"])
    p.condition([(ICD10, "I10", "Essential (primary) hypertension")], "2020-01-01")
    scenario(
        "non-net",
        "no neuroendocrine tumour on record (hypertension only): excluded "
        "from both, not needs-review",
        p,
        {
            A: {"status": "excluded", "inc-net-diagnosis": "fail", "inc-liver-metastases": "fail"},
            B: {"status": "excluded", "inc-pancreatic-net": "fail", "inc-liver-metastases": "fail"},
        },
    )

    p, r = base("ileal-net-a-only")
    p.remove(r["pnet"])
    p.condition(ILEAL_NET, "2025-10-01")
    scenario(
        "ileal-net-a-only",
        "small-bowel NET G2 with liver metastases: a candidate for "
        "the CapTem + Y90 trial (any primary), excluded from the pancreatic trial",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass"},
            B: {"status": "excluded", "inc-pancreatic-net": "fail"},
        },
    )

    p, r = base("grade-unrecorded")
    p.remove(r["ki67"])
    scenario(
        "grade-unrecorded",
        "pancreatic NET with no grade, Ki-67 or differentiation "
        "recorded: needs review for both, not excluded",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "inc-grade-1-2": "unknown", "exc-grade-3": "unknown"},
        },
    )

    p, r = base("grade-1-b-only")
    p.remove(r["ki67"])
    p.coded_obs("21858-6", "Grade Cancer", (SNOMED, "54102005", "G1 grade (finding)"), "2025-11-10")
    scenario(
        "grade-1-b-only",
        "recorded histologic grade G1: excluded from the grade 2 "
        "trial, a candidate for the G1/G2 pancreatic trial",
        p,
        {
            A: {"status": "excluded", "inc-grade-2": "fail"},
            B: {"status": "candidate", "inc-grade-1-2": "pass", "exc-grade-3": "pass"},
        },
    )

    p, r = base("grade-3-ki67")
    r["ki67"]["valueQuantity"]["value"] = 35
    scenario(
        "grade-3-ki67",
        "Ki-67 35 % (G3 by WHO 2019): excluded from both",
        p,
        {
            A: {"status": "excluded", "inc-grade-2": "fail"},
            B: {"status": "excluded", "inc-grade-1-2": "fail", "exc-grade-3": "fail"},
        },
    )

    p, r = base("grade-conflict")
    p.remove(r["ki67"])
    p.coded_obs("21858-6", "Grade Cancer", (SNOMED, "1663004", "G2 grade (finding)"), "2025-11-10")
    p.condition(
        [(ICD10, "C7A.1", "Malignant poorly differentiated neuroendocrine tumors")], "2025-11-03"
    )
    scenario(
        "grade-conflict",
        "a recorded G2 and a poorly differentiated diagnosis code "
        "disagree: grade unknown, needs review",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "exc-grade-3": "unknown"},
        },
    )

    p, r = base("si-units")
    for role, value, unit in (
        ("bili", 15, "umol/L"),
        ("creat", 80, "umol/L"),
        ("alb", 40, "g/L"),
        ("hb", 8.5, "mmol/L"),
        ("plt", 210, "10*9/L"),
        ("wbc", 6200, "/uL"),
    ):
        q = r[role]["valueQuantity"]
        q.update(value=value, unit=unit, code=unit)
        r[role].pop("referenceRange", None)
    r["plt"]["valueQuantity"]["unit"] = "x10^9/L"  # a common non-UCUM spelling; code is UCUM
    scenario(
        "si-units",
        "labs sent in SI units (bilirubin and creatinine µmol/L, albumin "
        "g/L, haemoglobin mmol/L, counts in 10*9/L and /uL): converted, all pass",
        p,
        {
            A: {
                "status": "candidate",
                "inc-bilirubin": "pass",
                "inc-creatinine": "pass",
                "inc-albumin": "pass",
                "inc-platelets": "pass",
            },
            B: {
                "status": "candidate",
                "exc-hemoglobin": "pass",
                "exc-wbc": "pass",
                "exc-albumin": "pass",
                "exc-renal-function": "pass",
            },
        },
    )

    p, r = base("labs-out-of-range")
    r["bili"]["valueQuantity"]["value"] = 2.5  # A: > 2.0 fails; B: <= 3 passes
    r["alt"]["valueQuantity"]["value"] = 250  # 6.25 x ULN 40
    r["ast"]["valueQuantity"]["value"] = 120  # 3 x ULN: passes
    r["alb"]["valueQuantity"]["value"] = 2.2  # A fails; B fails but PT normal rescues
    r["plt"]["valueQuantity"]["value"] = 90  # A: <= 100, unknown (transfusion); B: >= 75
    r["creat"]["valueQuantity"]["value"] = 2.3  # A fails; B: CG 40 mL/min fails
    r["inr"]["valueQuantity"]["value"] = 1.7  # A unknown (transfusion); B: normal PT, unknown
    r["hb"]["valueQuantity"]["value"] = 7.1  # B fails
    r["wbc"]["valueQuantity"]["value"] = 1.5  # B fails
    scenario(
        "labs-out-of-range",
        "labs beyond the limits: A fails bilirubin, ALT, albumin and creatinine, "
        "while platelets and INR are unknown (the protocol allows correction by "
        "transfusion; fail before NCT04339036 1.2.0); B fails creatinine clearance, Hb and "
        "WBC, its albumin limit is waived by a normal prothrombin time, and an INR of 1.7 "
        "with a normal prothrombin time is unknown (inconsistent; a pass before "
        "NCT05610826 1.2.0, which gives the PT waiver to albumin only)",
        p,
        {
            A: {
                "status": "excluded",
                "inc-bilirubin": "fail",
                "inc-alt": "fail",
                "inc-ast": "pass",
                "inc-albumin": "fail",
                "inc-platelets": "unknown",
                "inc-creatinine": "fail",
                "inc-inr": "unknown",
            },
            B: {
                "status": "excluded",
                "exc-bilirubin": "pass",
                "exc-inr": "unknown",
                "exc-albumin": "pass",
                "exc-platelets": "pass",
                "exc-renal-function": "fail",
                "exc-hemoglobin": "fail",
                "exc-wbc": "fail",
            },
        },
    )

    p, r = base("pt-abnormal")
    r["inr"]["valueQuantity"]["value"] = 1.7
    r["alb"]["valueQuantity"]["value"] = 2.8
    r["pt"]["valueQuantity"]["value"] = 16.0
    r["ast"]["valueQuantity"]["value"] = 220
    r["bili"]["valueQuantity"]["value"] = 3.4
    r["plt"]["valueQuantity"]["value"] = 60
    scenario(
        "pt-abnormal",
        "liver failure signs: INR 1.7 and albumin 2.8 with a prolonged "
        "prothrombin time (the pancreatic trial's PT exception does not apply), bilirubin "
        "3.4 mg/dL, AST 5.5 x ULN, platelets 60 (A's platelet and INR limits are unknown: "
        "correctable by transfusion, a fail before NCT04339036 1.2.0)",
        p,
        {
            A: {
                "status": "excluded",
                "inc-inr": "unknown",
                "inc-albumin": "pass",
                "inc-ast": "fail",
                "inc-bilirubin": "fail",
                "inc-platelets": "unknown",
            },
            B: {
                "status": "excluded",
                "exc-inr": "fail",
                "exc-albumin": "fail",
                "exc-bilirubin": "fail",
                "exc-platelets": "fail",
            },
        },
    )

    p, r = base("labs-stale")
    for role in ("bili", "alt", "ast", "alb", "plt", "creat", "inr", "pt", "hb", "wbc"):
        r[role]["effectiveDateTime"] = "2026-08-01"
    scenario(
        "labs-stale",
        "every lab is from 2026-08-01, outside the 30-day window: the lab "
        "criteria are unknown and both trials need review",
        p,
        {
            A: {
                "status": "needs-review",
                "inc-bilirubin": "unknown",
                "inc-alt": "unknown",
                "inc-platelets": "unknown",
                "inc-inr": "unknown",
            },
            B: {
                "status": "needs-review",
                "exc-hemoglobin": "unknown",
                "exc-renal-function": "unknown",
            },
        },
    )

    p, r = base("latest-wins")
    p.lab("777-3", "Platelets", 60, "10*3/uL", "2026-10-05", high=400, low=150)
    r["plt"]["effectiveDateTime"] = "2026-10-25"
    p.lab("1975-2", "Bilirubin.total", 1.0, "mg/dL", "2026-10-05", high=1.2)
    r["bili"]["valueQuantity"]["value"] = 2.6
    r["bili"]["effectiveDateTime"] = "2026-10-28"
    scenario(
        "latest-wins",
        "an older low platelet count is superseded by a normal one, and "
        "an older normal bilirubin by a high one: the latest result decides",
        p,
        {
            A: {"status": "excluded", "inc-platelets": "pass", "inc-bilirubin": "fail"},
            B: {"status": "candidate", "exc-platelets": "pass"},
        },
    )

    p, r = base("entered-in-error")
    p.procedure(
        [(SNOMED, "314617008", "Chemoembolization of hepatic artery")],
        "2025-12-01",
        status="entered-in-error",
    )
    p.med_admin(
        "200328", "capecitabine 500 MG Oral Tablet", "2026-10-15", status="entered-in-error"
    )
    p.lab("777-3", "Platelets", 40, "10*3/uL", "2026-10-30", status="entered-in-error")
    p.condition([(SNOMED, "19943007", "Cirrhosis of liver")], "2026-01-01", verification="refuted")
    p.procedure([(CPT, "43274", "ERCP with stent placement")], "2026-03-01", status="not-done")
    scenario(
        "entered-in-error",
        "a TACE, a capecitabine dose and a platelet count entered in "
        "error, a refuted cirrhosis and a not-done biliary stent: none of them counts",
        p,
        {
            A: {
                "status": "candidate",
                "exc-prior-liver-embolization": "pass",
                "inc-washout": "pass",
                "inc-platelets": "pass",
                "exc-biliary-intervention": "pass",
            },
            B: {
                "status": "candidate",
                "exc-prior-capecitabine-temozolomide": "pass",
                "exc-cirrhosis": "pass",
            },
        },
    )

    p, r = base("prior-tace")
    p.procedure([(SNOMED, "314617008", "Chemoembolization of hepatic artery")], "2024-06-11")
    scenario(
        "prior-tace",
        "a hepatic chemoembolization in 2024: excluded from both",
        p,
        {
            A: {"status": "excluded", "exc-prior-liver-embolization": "fail"},
            B: {"status": "excluded", "exc-prior-liver-directed-therapy": "fail"},
        },
    )

    p, r = base("embolization-site-unknown")
    p.procedure([(CPT, "37243", "Vascular embolization or occlusion, for tumors")], "2024-06-11")
    scenario(
        "embolization-site-unknown",
        "an embolization coded without its site (CPT 37243): "
        "unknown until someone confirms it was not hepatic",
        p,
        {
            A: {"status": "needs-review", "exc-prior-liver-embolization": "unknown"},
            B: {"status": "needs-review", "exc-prior-liver-directed-therapy": "unknown"},
        },
    )

    p, r = base("biliary-stent-b-only")
    p.procedure([(CPT, "43274", "ERCP with biliary stent placement")], "2025-09-02")
    scenario(
        "biliary-stent-b-only",
        "a transpapillary biliary stent: excluded from the CapTem + Y90 trial only",
        p,
        {A: {"status": "excluded", "exc-biliary-intervention": "fail"}, B: {"status": "candidate"}},
    )

    p, r = base("recent-capecitabine")
    p.med_admin("200328", "capecitabine 500 MG Oral Tablet", "2026-10-20")
    scenario(
        "recent-capecitabine",
        "capecitabine 12 days before the as-of date: washout "
        "fails for both, and prior capecitabine excludes from the pancreatic trial",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {
                "status": "excluded",
                "inc-chemotherapy-washout": "fail",
                "exc-prior-capecitabine-temozolomide": "fail",
            },
        },
    )

    p, r = base("somatostatin-analogue")
    p.med_statement("312068", "octreotide", "2026-03-01")
    scenario(
        "somatostatin-analogue",
        "ongoing octreotide (a somatostatin analogue, not chemotherapy): the washouts pass",
        p,
        {
            A: {"status": "candidate", "inc-washout": "pass"},
            B: {"status": "candidate", "inc-chemotherapy-washout": "pass"},
        },
    )

    p, r = base("recent-radiotherapy")
    p.procedure([(CPT, "77385", "Intensity modulated radiation treatment delivery")], "2026-10-15")
    p.med_admin("4179", "etoposide", "2026-06-01")
    scenario(
        "recent-radiotherapy",
        "external beam radiotherapy 17 days ago and etoposide "
        "in June: the CapTem + Y90 washout (chemo or radiotherapy) fails, the pancreatic "
        "trial's chemotherapy washout passes and its marrow-radiation exclusion is unknown "
        "(a candidate before NCT05610826 1.2.0: radiotherapy on record now asks whether more "
        "than 25 % of the marrow was irradiated)",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {
                "status": "needs-review",
                "inc-chemotherapy-washout": "pass",
                "exc-bone-marrow-radiation": "unknown",
            },
        },
    )

    p, r = base("liver-and-heart-disease")
    p.condition([(SNOMED, "19943007", "Cirrhosis of liver")], "2024-02-01")
    p.condition([(ICD10, "C79.31", "Secondary malignant neoplasm of brain")], "2026-05-01")
    p.condition([(ICD10, "I50.22", "Chronic systolic (congestive) heart failure")], "2023-01-01")
    p.condition([(ICD10, "R18.8", "Other ascites")], "2026-09-01")
    p.condition([(ICD10, "R32", "Unspecified urinary incontinence")], "2025-01-01")
    p.condition([(ICD10, "I81", "Portal vein thrombosis")], "2026-08-01")
    scenario(
        "liver-and-heart-disease",
        "cirrhosis and ascites (exclude from the pancreatic "
        "trial); brain metastases, heart failure and urinary incontinence (unknown: treated "
        "and stable? NYHA class? safe to give PRRT?); portal vein thrombosis (patency to "
        "confirm for the Y90 trial); the heart failure makes the Y90 trial's uncontrolled "
        "intercurrent illness unknown (manual before NCT04339036 1.1.0)",
        p,
        {
            A: {
                "status": "needs-review",
                "exc-intercurrent-illness": "unknown",
                "inc-portal-vein": "unknown",
            },
            B: {
                "status": "excluded",
                "exc-cirrhosis": "fail",
                "exc-ascites": "fail",
                "exc-brain-metastases": "unknown",
                "exc-heart-failure": "unknown",
                "exc-urinary-incontinence": "unknown",
            },
        },
    )

    # --- issue 12: codings real NET patients carry -------------------------------------
    p, r = base("net-snomed-site-specific")
    p.remove(r["pnet"])
    # liver metastases coded without a NET code, so that only the SNOMED concept says NET
    p.remove(r["liver"])
    p.condition(LIVER_SECONDARY, "2025-10-01")
    p.condition(
        [(SNOMED, "192701000119101", "Malignant carcinoid tumor of ileum (disorder)")], "2025-10-01"
    )
    scenario(
        "net-snomed-site-specific",
        "a small-bowel NET coded only as the SNOMED CT site-specific concept 'malignant "
        "carcinoid tumor of ileum': a NET diagnosis for the any-primary trial, not a "
        "pancreatic NET (liver metastases coded C78.7)",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass"},
            B: {"status": "excluded", "inc-pancreatic-net": "fail"},
        },
    )

    p, r = base("islet-cell-snomed")
    p.remove(r["pnet"])
    # liver metastases coded without a NET code, so that only the SNOMED concept says NET
    p.remove(r["liver"])
    p.condition(LIVER_SECONDARY, "2025-10-01")
    p.condition(
        [(SNOMED, "187794005", "Malignant tumor of Islets of Langerhans (disorder)")], "2025-10-01"
    )
    scenario(
        "islet-cell-snomed",
        "a pancreatic NET coded only as SNOMED CT 'malignant tumor of islets of "
        "Langerhans' (liver metastases coded C78.7): a NET and a pancreatic NET, a "
        "candidate for both",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass"},
            B: {"status": "candidate", "inc-pancreatic-net": "pass"},
        },
    )

    p, r = base("recent-gemcitabine")
    p.med_admin("1720960", "26.3 ML gemcitabine 38 MG/ML Injection", "2026-10-18")
    scenario(
        "recent-gemcitabine",
        "gemcitabine 14 days ago (cytotoxic, though not a NET regimen): both "
        "chemotherapy washouts fail",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "excluded", "inc-chemotherapy-washout": "fail"},
        },
    )

    p, r = base("chemotherapy-procedure")
    p.procedure(
        [(CPT, "96413", "Chemotherapy administration, intravenous infusion, up to 1 hour")],
        "2026-10-22",
    )
    scenario(
        "chemotherapy-procedure",
        "chemotherapy recorded only as an administration procedure (CPT 96413) 10 days "
        "ago, with no drug record: both washouts fail",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "excluded", "inc-chemotherapy-washout": "fail"},
        },
    )

    p, r = base("recent-radiotherapy-broad")
    p.procedure(
        [(SNOMED, "108290001", "Radiation oncology AND/OR radiotherapy (procedure)")],
        "2026-10-20",
    )
    scenario(
        "recent-radiotherapy-broad",
        "radiotherapy coded as the general SNOMED CT concept (not an external-beam "
        "code) 12 days ago: the CapTem + Y90 washout fails; the pancreatic trial has no "
        "radiotherapy washout, and its marrow-radiation exclusion is unknown (confirm the "
        "marrow fraction from the plan)",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "needs-review", "exc-bone-marrow-radiation": "unknown"},
        },
    )

    p, r = base("prrt-medication")
    p.med_admin("1999682", "Lutathera (lutetium Lu 177 dotatate) injection", "2026-10-10")
    scenario(
        "prrt-medication",
        "PRRT recorded as a MedicationAdministration of Lutathera 22 days ago (no "
        "procedure code): the CapTem + Y90 washout (radiotherapy) fails",
        p,
        {A: {"status": "excluded", "inc-washout": "fail"}, B: {"status": "candidate"}},
    )

    p, r = base("biliary-stent-percutaneous")
    p.procedure([(CPT, "47538", "Percutaneous placement of biliary stent")], "2025-09-02")
    scenario(
        "biliary-stent-percutaneous",
        "a percutaneous biliary stent (CPT 47538), course across the papilla not "
        "recorded: unknown for the CapTem + Y90 trial ('confirm transpapillary'), not an "
        "exclusion",
        p,
        {
            A: {"status": "needs-review", "exc-biliary-intervention": "unknown"},
            B: {"status": "candidate"},
        },
    )

    p, r = base("other-active-cancer")
    p.condition(
        [(ICD10, "C50.911", "Malignant neoplasm of unspecified site of right female breast")],
        "2026-03-01",
    )
    p.condition([(ICD10, "C44.91", "Basal cell carcinoma of skin, unspecified")], "2026-02-01")
    scenario(
        "other-active-cancer",
        "an active breast cancer besides the pancreatic NET (and a basal cell skin "
        "carcinoma, which the protocol exempts): the pancreatic trial's other-malignancy "
        "exclusion is unknown ('confirm definitively treated'), naming the breast cancer",
        p,
        {
            A: {"status": "candidate"},
            B: {"status": "needs-review", "exc-other-malignancy": "unknown"},
        },
    )

    p, r = base("skin-cancer-only")
    p.condition([(ICD10, "C44.91", "Basal cell carcinoma of skin, unspecified")], "2026-02-01")
    scenario(
        "skin-cancer-only",
        "a basal cell skin carcinoma is the only other cancer: exempt by the protocol, the "
        "other-malignancy criterion stays with the study team (manual)",
        p,
        {B: {"status": "candidate", "exc-other-malignancy": "manual"}},
    )

    p, r = base("active-sepsis")
    p.condition([(ICD10, "A40.1", "Sepsis due to streptococcus, group B")], "2026-10-28")
    scenario(
        "active-sepsis",
        "an active streptococcal sepsis: the CapTem + Y90 trial's uncontrolled "
        "intercurrent illness is unknown (named), never a fail",
        p,
        {A: {"status": "needs-review", "exc-intercurrent-illness": "unknown"}},
    )

    # --- issue 12: rules as the protocols write them --------------------------------------
    p, r = base("net-ki67-only")
    p.remove(r["pnet"])
    p.remove(r["liver"])
    p.condition(LIVER_SECONDARY, "2025-10-01")
    scenario(
        "net-ki67-only",
        "a Ki-67 result and liver metastases but no NET code: the NET criteria are unknown "
        "(a NET signal), not 'no NET on record'",
        p,
        {
            A: {"status": "needs-review", "inc-net-diagnosis": "unknown"},
            B: {"status": "needs-review", "inc-pancreatic-net": "unknown"},
        },
    )

    # A record that names the disease or the procedure in words only: free-text problem-list
    # entries and procedures without a standard code (issue 12: never "none on record").
    p, r = base("net-text-only")
    p.remove(r["pnet"])
    p.remove(r["liver"])
    net = p.condition([], "2025-11-03")
    net["code"] = {"text": "Well-differentiated pancreatic neuroendocrine tumour"}
    mets = p.condition([], "2025-11-03")
    mets["code"] = {"text": "Metastatic disease to the liver"}
    family = p.condition([], "2020-01-01")
    family["code"] = {"text": "Family history of carcinoid tumour"}
    scenario(
        "net-text-only",
        "the NET and its liver metastases written only as problem-list text, no code (and a "
        "family history of carcinoid, which does not count): the NET and liver-metastases "
        "criteria are unknown, quoting the words, never 'no NET on record'",
        p,
        {
            A: {
                "status": "needs-review",
                "inc-net-diagnosis": "unknown",
                "inc-liver-metastases": "unknown",
            },
            B: {
                "status": "needs-review",
                "inc-pancreatic-net": "unknown",
                "inc-liver-metastases": "unknown",
            },
        },
    )

    p, r = base("tace-text-only")
    tace = p.procedure([], "2024-06-11")
    tace["code"] = {"text": "TACE, right hepatic lobe"}
    scenario(
        "tace-text-only",
        "a procedure recorded as the words 'TACE, right hepatic lobe' with no code: the prior "
        "liver-directed therapy exclusions are unknown (confirm), never 'none on record'",
        p,
        {
            A: {"status": "needs-review", "exc-prior-liver-embolization": "unknown"},
            B: {"status": "needs-review", "exc-prior-liver-directed-therapy": "unknown"},
        },
    )

    # Sites in Condition.bodySite and Procedure.bodySite (mCODE binds them to SNOMED CT body
    # structures or ICD-O-3 topography), not in the code.
    p, r = base("pnet-by-body-site")
    p.remove(r["pnet"])
    p.remove(r["liver"])
    net = p.condition([(ICD10, "C7A.8", "Other malignant neuroendocrine tumors")], "2025-11-03")
    net["bodySite"] = [
        {"coding": [{"system": SNOMED, "code": "15776009", "display": "Pancreatic structure"}]}
    ]
    mets = p.condition(
        [(SNOMED, "128462008", "Secondary malignant neoplastic disease")], "2025-11-03"
    )
    mets["bodySite"] = [
        {"coding": [{"system": SNOMED, "code": "10200004", "display": "Liver structure"}]}
    ]
    scenario(
        "pnet-by-body-site",
        "a NET coded without its primary site (C7A.8) whose bodySite is the pancreas, and "
        "secondary malignant disease whose bodySite is the liver: a pancreatic NET with liver "
        "metastases, a candidate for both",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass", "inc-liver-metastases": "pass"},
            B: {
                "status": "candidate",
                "inc-pancreatic-net": "pass",
                "inc-liver-metastases": "pass",
            },
        },
    )

    p, r = base("embolization-liver-body-site")
    emb = p.procedure(
        [(CPT, "37243", "Vascular embolization or occlusion, for tumors")], "2024-06-11"
    )
    emb["bodySite"] = [
        {"coding": [{"system": SNOMED, "code": "10200004", "display": "Liver structure"}]}
    ]
    scenario(
        "embolization-liver-body-site",
        "an embolization coded CPT 37243 (target not in the code) whose bodySite is the liver: "
        "a hepatic embolization, excluded from both (unknown before 1.3.0)",
        p,
        {
            A: {"status": "excluded", "exc-prior-liver-embolization": "fail"},
            B: {"status": "excluded", "exc-prior-liver-directed-therapy": "fail"},
        },
    )

    # Enrolment in another study (issue 12 section 5): FHIR R4 ResearchSubject.
    p, r = base("other-study-enrolment")
    p.resources.append(
        {
            "resourceType": "ResearchStudy",
            "id": "other-study-enrolment-study",
            "status": "active",
            "title": "A phase 2 study of an investigational agent (fictional)",
        }
    )
    p.resources.append(
        {
            "resourceType": "ResearchSubject",
            "id": "other-study-enrolment-rs1",
            "status": "on-study-intervention",
            "period": {"start": "2026-09-15"},
            "study": {
                "reference": "ResearchStudy/other-study-enrolment-study",
                "display": "Phase 2 investigational agent study",
            },
            "individual": {"reference": "Patient/other-study-enrolment"},
        }
    )
    p.resources.append(
        {
            "resourceType": "ResearchSubject",
            "id": "other-study-enrolment-rs2",
            "status": "off-study",
            "period": {"start": "2023-01-10", "end": "2023-06-30"},
            "study": {"display": "An earlier study, finished"},
            "individual": {"reference": "Patient/other-study-enrolment"},
        }
    )
    scenario(
        "other-study-enrolment",
        "on another study since September (a ResearchSubject on-study-intervention) and off an "
        "earlier one: the CapTem + Y90 trial's 'other investigational agents' is unknown, "
        "naming the study (manual before NCT04339036 1.3.0); the earlier study does not count",
        p,
        {
            A: {"status": "needs-review", "exc-investigational-agents": "unknown"},
            B: {"status": "candidate"},
        },
    )

    p, r = base("net-benign-coded")
    p.remove(r["pnet"])
    p.remove(r["liver"])
    p.remove(r["ki67"])
    p.condition([(ICD10, "D3A.8", "Other benign neuroendocrine tumors")], "2025-10-01")
    p.condition(LIVER_SECONDARY, "2025-10-01")
    scenario(
        "net-benign-coded",
        "a NET coded as benign (D3A.8) with liver metastases: unknown ('recorded as "
        "benign; liver metastases imply malignancy'), neither a NET nor 'no NET'",
        p,
        {
            A: {"status": "needs-review", "inc-net-diagnosis": "unknown"},
            B: {"status": "needs-review", "inc-pancreatic-net": "unknown"},
        },
    )

    p, r = base("pnet-by-site-code")
    p.remove(r["pnet"])
    p.condition([(ICD10, "C7A.8", "Other malignant neuroendocrine tumors")], "2025-10-01")
    p.condition([(ICD10, "C25.0", "Malignant neoplasm of head of pancreas")], "2025-10-01")
    scenario(
        "pnet-by-site-code",
        "a NET coded C7A.8 with the site coded C25.0 (head of pancreas): a pancreatic "
        "NET, a candidate for both",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass"},
            B: {"status": "candidate", "inc-pancreatic-net": "pass"},
        },
    )

    p, r = base("net-unknown-primary")
    p.remove(r["pnet"])
    p.condition([(ICD10, "C7A.00", "Malignant carcinoid tumor of unspecified site")], "2025-10-01")
    scenario(
        "net-unknown-primary",
        "a NET of unknown primary (C7A.00): a NET for the any-primary trial; unknown for "
        "the pancreatic trial ('confirm a pancreatic primary')",
        p,
        {
            A: {"status": "candidate", "inc-net-diagnosis": "pass"},
            B: {"status": "needs-review", "inc-pancreatic-net": "unknown"},
        },
    )

    p, r = base("secondary-net-unstated-site")
    p.remove(r["liver"])
    p.condition([(ICD10, "C7B.8", "Other secondary neuroendocrine tumors")], "2025-11-03")
    scenario(
        "secondary-net-unstated-site",
        "metastases coded only as C7B.8 (other secondary NETs, site not stated): liver "
        "metastases unknown for both ('confirm liver involvement')",
        p,
        {
            A: {"status": "needs-review", "inc-liver-metastases": "unknown"},
            B: {"status": "needs-review", "inc-liver-metastases": "unknown"},
        },
    )

    p, r = base("ki67-below-3")
    r["ki67"]["valueQuantity"]["value"] = 2
    scenario(
        "ki67-below-3",
        "Ki-67 2 % and no mitotic count: G1 by Ki-67 alone, unknown for the grade 2 trial "
        "(a mitotic count could make it G2), G1/G2 for the pancreatic trial",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "candidate", "inc-grade-1-2": "pass"},
        },
    )

    # Issue 12: a NYHA class decides NCT05610826's heart failure exclusion (NCT04339036's
    # uncontrolled intercurrent illness stays unknown whatever the class).
    heart_failure = [(ICD10, "I50.22", "Chronic systolic (congestive) heart failure")]
    p, r = base("heart-failure-nyha-1")
    p.condition(heart_failure, "2023-01-01")
    p.coded_obs(
        "88020-3", "Functional capacity NYHA", (LOINC, "LA28404-4", "Class-I"), "2026-09-15"
    )
    scenario(
        "heart-failure-nyha-1",
        "heart failure with NYHA class I (LOINC 88020-3, answer LA28404-4) in the last 90 "
        "days: the pancreatic trial's heart failure exclusion (NYHA II-IV) passes; the Y90 "
        "trial's uncontrolled intercurrent illness stays unknown (a judgement)",
        p,
        {
            A: {"status": "needs-review", "exc-intercurrent-illness": "unknown"},
            B: {"status": "candidate", "exc-heart-failure": "pass"},
        },
    )

    p, r = base("heart-failure-nyha-3")
    p.condition(heart_failure, "2023-01-01")
    p.coded_obs(
        "88020-3", "Functional capacity NYHA", (LOINC, "LA28404-4", "Class-I"), "2026-03-02"
    )
    p.snomed_obs("420913000", "New York Heart Association Classification - Class III", "2026-10-05")
    scenario(
        "heart-failure-nyha-3",
        "heart failure whose latest NYHA class is III (an Observation coded with the SNOMED CT "
        "class finding), an older class I superseded: excluded from the pancreatic trial "
        "(NYHA II-IV); the Y90 trial's uncontrolled intercurrent illness is unknown",
        p,
        {
            A: {"status": "needs-review", "exc-intercurrent-illness": "unknown"},
            B: {"status": "excluded", "exc-heart-failure": "fail"},
        },
    )

    # Issue 12: the mitotic count is read with the Ki-67 index (WHO 2019: the higher grade).
    mitoses = "Number of mitoses per 10 high power fields (observable entity)"
    p, r = base("ki67-mitoses-g2")
    r["ki67"]["valueQuantity"]["value"] = 2
    p.snomed_obs(
        "406094009",
        mitoses,
        "2025-11-10",
        value={"valueQuantity": {"value": 5, "unit": "/10 HPF"}},
    )
    scenario(
        "ki67-mitoses-g2",
        "Ki-67 2 % (G1 alone) with a mitotic count of 5 per 10 HPF (G2): WHO 2019 takes the "
        "higher, G2, a candidate for both trials (without the count the grade 2 trial is "
        "unknown, see ki67-below-3)",
        p,
        {
            A: {"status": "candidate", "inc-grade-2": "pass"},
            B: {"status": "candidate", "inc-grade-1-2": "pass", "exc-grade-3": "pass"},
        },
    )

    p, r = base("mitoses-without-ki67")
    p.remove(r["ki67"])
    p.snomed_obs("406094009", mitoses, "2025-11-10", value={"valueQuantity": {"value": 5}})
    scenario(
        "mitoses-without-ki67",
        "a mitotic count of 5 per 10 HPF and no Ki-67 index: at least G2, but the Ki-67 grade "
        "could be higher, so the grade is unknown for both trials (needs review)",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "inc-grade-1-2": "unknown", "exc-grade-3": "unknown"},
        },
    )

    p, r = base("hb-molar-limit")
    r["hb"]["valueQuantity"].update(value=4.98, unit="mmol/L", code="mmol/L")
    r["hb"]["referenceRange"] = [
        {
            "low": {"value": 8.1, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
            "high": {"value": 10.9, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
        }
    ]
    scenario(
        "hb-molar-limit",
        "haemoglobin 4.98 mmol/L: below the protocol's 5.0 mmol/L, though 8.02 g/dL when "
        "converted: excluded from the pancreatic trial",
        p,
        {B: {"status": "excluded", "exc-hemoglobin": "fail"}},
    )

    p, r = base("mapping-coil-only")
    p.procedure(
        [
            (
                CPT,
                "37242",
                "Vascular embolization/occlusion, arterial, other than hemorrhage or tumor",
            )
        ],
        "2026-09-15",
    )
    scenario(
        "mapping-coil-only",
        "CPT 37242 alone (coil embolization of a non-target vessel, as at a Y-90 mapping "
        "session): not a prior liver-directed therapy, and no longer a question (it was "
        "'site unspecified', unknown, before version 1.2.0 of both definitions)",
        p,
        {
            A: {"status": "candidate", "exc-prior-liver-embolization": "pass"},
            B: {"status": "candidate", "exc-prior-liver-directed-therapy": "pass"},
        },
    )

    p, r = base("capecitabine-supply")
    p.resources.append(
        {
            "resourceType": "MedicationRequest",
            "id": "capecitabine-supply-rx1",
            "status": "completed",
            "intent": "order",
            "subject": {"reference": "Patient/capecitabine-supply"},
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": "200328", "display": "capecitabine 500 MG"}]
            },
            "authoredOn": "2026-09-20",
            "dispenseRequest": {
                "expectedSupplyDuration": {
                    "value": 21,
                    "unit": "days",
                    "system": UCUM,
                    "code": "d",
                }
            },
        }
    )
    scenario(
        "capecitabine-supply",
        "capecitabine ordered 42 days ago for a 21-day supply: the last dose is 2026-10-10, "
        "22 days ago, so the CapTem + Y90 washout fails (the order date alone passed it "
        "before issue 12)",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "excluded", "inc-chemotherapy-washout": "fail"},
        },
    )

    p, r = base("grade-as-text")
    p.remove(r["ki67"])
    p.resources.append(
        {
            "resourceType": "Observation",
            "id": "grade-as-text-obs99",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "21858-6", "display": "Grade Cancer"}]},
            "subject": {"reference": "Patient/grade-as-text"},
            "effectiveDateTime": "2025-11-10",
            "valueString": "Grade 2 (WHO 2019)",
        }
    )
    scenario(
        "grade-as-text",
        "the grade recorded only as text ('Grade 2 (WHO 2019)') and no Ki-67: read as G2, "
        "a candidate for both",
        p,
        {
            A: {"status": "candidate", "inc-grade-2": "pass"},
            B: {"status": "candidate", "inc-grade-1-2": "pass"},
        },
    )

    p, r = base("grade-mcode-intermediate")
    p.remove(r["ki67"])
    p.coded_obs(
        "21858-6",
        "Grade Cancer",
        (SNOMED, "1286893008", "Intermediate histologic grade (qualifier value)"),
        "2025-11-10",
    )
    scenario(
        "grade-mcode-intermediate",
        "an mCODE histologic grade 'intermediate' (WHO 2019: G2) and no Ki-67: G2, a "
        "candidate for both",
        p,
        {A: {"status": "candidate", "inc-grade-2": "pass"}, B: {"status": "candidate"}},
    )

    p, r = base("ki67-discordant")
    p.lab("29593-1", "Ki-67 index", 25, "%", "2026-06-01")
    scenario(
        "ki67-discordant",
        "Ki-67 8 % (2025) and 25 % (2026): the results disagree across the G2/G3 boundary, "
        "grade unknown for both, naming both results",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "inc-grade-1-2": "unknown", "exc-grade-3": "unknown"},
        },
    )

    p, r = base("nec-nos-low-ki67")
    p.condition([(SNOMED, "253000007", "Neuroendocrine carcinoma (disorder)")], "2025-11-03")
    scenario(
        "nec-nos-low-ki67",
        "'neuroendocrine carcinoma' (not said to be poorly differentiated) with Ki-67 8 %: "
        "grade unknown, not G3",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "exc-grade-3": "unknown"},
        },
    )

    p, r = base("whipple-pcs-parts")
    pcs = "http://www.cms.gov/Medicare/Coding/ICD10"
    p.procedure([(pcs, "0FBG0ZZ", "Excision of Pancreas, Open Approach")], "2024-03-05")
    p.procedure([(pcs, "0DT90ZZ", "Resection of Duodenum, Open Approach")], "2024-03-05")
    scenario(
        "whipple-pcs-parts",
        "a Whipple coded only as its ICD-10-PCS parts (open excision of pancreas and open "
        "resection of duodenum, same day): a biliary-enteric anastomosis, excluded from the "
        "CapTem + Y90 trial",
        p,
        {A: {"status": "excluded", "exc-biliary-intervention": "fail"}, B: {"status": "candidate"}},
    )

    p, r = base("allergies-captem-contrast")
    for n, (system, code, display) in enumerate(
        [
            (RXNORM, "4492", "Fluorouracil"),
            (SNOMED, "426722004", "Iodinated contrast media (substance)"),
        ],
        start=1,
    ):
        p.resources.append(
            {
                "resourceType": "AllergyIntolerance",
                "id": f"allergies-captem-contrast-allergy{n}",
                "patient": {"reference": "Patient/allergies-captem-contrast"},
                "code": {"coding": [{"system": system, "code": code, "display": display}]},
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/"
                            "allergyintolerance-clinical",
                            "code": "active",
                        }
                    ]
                },
                "recordedDate": "2024-05-01",
            }
        )
    scenario(
        "allergies-captem-contrast",
        "allergies to fluorouracil (capecitabine's active metabolite) and to iodinated "
        "contrast: the CapTem + Y90 trial's contraindication and contrast criteria are "
        "unknown (named), not manual and not a fail",
        p,
        {
            A: {
                "status": "needs-review",
                "exc-capecitabine-temozolomide-contraindication": "unknown",
                "exc-iodinated-contrast": "unknown",
            },
            B: {"status": "candidate"},
        },
    )

    p, r = base("recent-everolimus")
    p.med_admin("845507", "everolimus 10 MG Oral Tablet", "2026-10-22")
    scenario(
        "recent-everolimus",
        "everolimus (an mTOR inhibitor, not cytotoxic chemotherapy) 10 days ago: both "
        "washouts unknown with the drug named, never a fail",
        p,
        {
            A: {"status": "needs-review", "inc-washout": "unknown"},
            B: {"status": "needs-review", "inc-chemotherapy-washout": "unknown"},
        },
    )

    p, r = base("provisional-exclusions")
    p.condition(
        [(SNOMED, "19943007", "Cirrhosis of liver")], "2026-09-01", verification="provisional"
    )
    p.condition([(ICD10, "R18.8", "Other ascites")], "2026-09-01", verification="differential")
    scenario(
        "provisional-exclusions",
        "cirrhosis and ascites recorded only as provisional or "
        "differential diagnoses: unknown, not excluded",
        p,
        {B: {"status": "needs-review", "exc-cirrhosis": "unknown", "exc-ascites": "unknown"}},
    )

    p, r = base("uncertain-history")
    stent = p.procedure(
        [(CPT, "43274", "ERCP with biliary stent placement")], "2025-09-02", status="unknown"
    )
    tmz = p.med_statement("37776", "temozolomide", "2026-01-01", status="unknown")
    del tmz["effectivePeriod"]
    scenario(
        "uncertain-history",
        "a biliary stent with status 'unknown' and an undated "
        "temozolomide statement with status 'unknown': the history and washout criteria "
        "are unknown",
        p,
        {
            A: {
                "status": "needs-review",
                "exc-biliary-intervention": "unknown",
                "inc-washout": "unknown",
            },
            B: {
                "status": "needs-review",
                "exc-prior-capecitabine-temozolomide": "unknown",
                "inc-chemotherapy-washout": "unknown",
            },
        },
    )
    assert stent["status"] == "unknown"

    p, r = base("hcg-quantitative", gender="female", birth="1989-07-30")
    p.lab(
        "21198-7",
        "Choriogonadotropin.beta subunit [Units/volume] in Serum or Plasma",
        3,
        "m[IU]/mL",
        "2026-10-28",
    )
    scenario(
        "hcg-quantitative",
        "a quantitative serum hCG without an interpretation: the "
        "service does not guess a cut-off, pregnancy is unknown",
        p,
        {
            A: {"status": "needs-review", "exc-pregnancy": "unknown"},
            B: {"status": "needs-review", "exc-pregnancy": "unknown"},
        },
    )

    p, r = base("diabetes-uncontrolled")
    p.condition([(ICD10, "E11.9", "Type 2 diabetes mellitus without complications")], "2019-01-01")
    p.lab("1558-6", "Fasting glucose", 250, "mg/dL", "2026-10-20", high=99, low=70)
    scenario(
        "diabetes-uncontrolled",
        "type 2 diabetes with fasting glucose 250 mg/dL "
        "(> 2 x ULN 99): excluded from the pancreatic trial",
        p,
        {
            A: {"status": "candidate"},
            B: {"status": "excluded", "exc-uncontrolled-diabetes": "fail"},
        },
    )

    p, r = base("diabetes-no-glucose")
    p.condition([(ICD10, "E11.9", "Type 2 diabetes mellitus without complications")], "2019-01-01")
    scenario(
        "diabetes-no-glucose",
        "type 2 diabetes with no fasting glucose on record: unknown",
        p,
        {B: {"status": "needs-review", "exc-uncontrolled-diabetes": "unknown"}},
    )

    p, r = base("pregnant", gender="female", birth="1991-02-09")
    p.coded_obs(
        "2106-3",
        "Choriogonadotropin (pregnancy test) [Presence] in Urine",
        (SNOMED, "10828004", "Positive"),
        "2026-10-28",
    )
    scenario(
        "pregnant",
        "positive urine hCG 4 days ago: excluded from both",
        p,
        {
            A: {"status": "excluded", "exc-pregnancy": "fail"},
            B: {"status": "excluded", "exc-pregnancy": "fail"},
        },
    )

    p, r = base("renal-low-clearance", gender="female", birth="1950-03-01")
    r["weight"]["valueQuantity"]["value"] = 50
    r["creat"]["valueQuantity"]["value"] = 1.3
    scenario(
        "renal-low-clearance",
        "76-year-old woman, 50 kg, creatinine 1.3 mg/dL: "
        "Cockcroft-Gault clearance 29 mL/min, excluded from the pancreatic trial",
        p,
        {
            A: {"status": "candidate", "inc-creatinine": "pass"},
            B: {"status": "excluded", "exc-renal-function": "fail"},
        },
    )

    p, r = base("renal-measured-confirms", gender="female", birth="1950-03-01")
    r["weight"]["valueQuantity"]["value"] = 50
    r["creat"]["valueQuantity"]["value"] = 1.3
    p.lab("2164-2", "Creatinine renal clearance in 24 hour urine", 62, "mL/min", "2026-10-22")
    scenario(
        "renal-measured-confirms",
        "the same low Cockcroft-Gault estimate, but a measured "
        "clearance of 62 mL/min (the protocol's confirmatory exam) passes",
        p,
        {B: {"status": "candidate", "exc-renal-function": "pass"}},
    )

    p, r = base("no-weight")
    p.remove(r["weight"])
    scenario(
        "no-weight",
        "no body weight on record: creatinine clearance cannot be calculated",
        p,
        {B: {"status": "needs-review", "exc-renal-function": "unknown"}},
    )

    p, r = base("minor", birth="2008-12-01")
    scenario(
        "minor",
        "17 years old on the as-of date: excluded from both",
        p,
        {
            A: {"status": "excluded", "inc-age": "fail"},
            B: {"status": "excluded", "inc-age": "fail"},
        },
    )

    p, r = base("no-birthdate", birth=None)
    scenario(
        "no-birthdate",
        "no birth date: age unknown",
        p,
        {
            A: {"status": "needs-review", "inc-age": "unknown"},
            B: {"status": "needs-review", "inc-age": "unknown", "exc-renal-function": "unknown"},
        },
    )

    p, r = base("ecog-3")
    r["ecog"]["valueCodeableConcept"]["coding"][0].update(
        code="LA9625-0", display="Capable of only limited selfcare"
    )
    scenario(
        "ecog-3",
        "ECOG 3: excluded from the CapTem + Y90 trial",
        p,
        {A: {"status": "excluded", "inc-ecog": "fail"}, B: {"status": "candidate"}},
    )

    p, r = base("ecog-stale")
    r["ecog"]["effectiveDateTime"] = "2026-05-01"
    scenario(
        "ecog-stale",
        "the only ECOG score is six months old: unknown",
        p,
        {A: {"status": "needs-review", "inc-ecog": "unknown"}},
    )

    p, r = base("preliminary-lab")
    r["plt"]["status"] = "preliminary"
    scenario(
        "preliminary-lab",
        "the latest platelet count is preliminary: it cannot pass",
        p,
        {
            A: {"status": "needs-review", "inc-platelets": "unknown"},
            B: {"status": "needs-review", "exc-platelets": "unknown"},
        },
    )

    p, r = base("malformed-observation")
    r["bili"]["valueQuantity"]["value"] = "high"
    scenario(
        "malformed-observation",
        "the bilirubin Observation is malformed (a text value "
        "where a number belongs): skipped with a warning, its criteria unknown, the rest "
        "evaluated",
        p,
        {
            A: {"status": "needs-review", "inc-bilirubin": "unknown", "inc-alt": "pass"},
            B: {"status": "needs-review", "exc-bilirubin": "unknown"},
        },
    )

    p, r = base("uln-missing")
    r["alt"].pop("referenceRange")
    scenario(
        "uln-missing",
        "ALT without a reference range: 5 x ULN cannot be judged",
        p,
        {A: {"status": "needs-review", "inc-alt": "unknown"}},
    )

    p, r = base("provisional-diagnosis")
    r["pnet"]["verificationStatus"]["coding"][0]["code"] = "provisional"
    r["liver"]["verificationStatus"]["coding"][0]["code"] = "provisional"
    r["liver"]["code"]["coding"] = [
        {
            "system": ICD10,
            "code": "C78.7",
            "display": "Secondary malignant neoplasm of liver and intrahepatic bile duct",
        }
    ]
    scenario(
        "provisional-diagnosis",
        "the pancreatic NET is only provisional (and the liver "
        "metastases are provisional too): unknown",
        p,
        {
            A: {
                "status": "needs-review",
                "inc-net-diagnosis": "unknown",
                "inc-liver-metastases": "unknown",
            },
            B: {
                "status": "needs-review",
                "inc-pancreatic-net": "unknown",
                "inc-liver-metastases": "unknown",
            },
        },
    )

    # --- shapes hospitals send (issue 15): each read as the base's own shape would be ---

    p, r = base("component-panel")
    for role in ("plt", "wbc", "hb"):
        p.remove(r[role])
    panel = p.lab("58410-2", "CBC panel - Blood by Automated count", None, None, LAB_DAY)
    panel["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            "referenceRange": [
                {
                    "low": {"value": low, "unit": unit, "system": UCUM, "code": unit},
                    "high": {"value": high, "unit": unit, "system": UCUM, "code": unit},
                }
            ],
        }
        for code, display, value, unit, low, high in (
            ("777-3", "Platelets", 210, "10*3/uL", 150, 400),
            ("6690-2", "Leukocytes", 6.2, "10*3/uL", 4.0, 11.0),
            ("718-7", "Hemoglobin", 13.5, "g/dL", 13.0, 17.5),
        )
    ]
    scenario(
        "component-panel",
        "platelets, white cells and haemoglobin sent as components of one blood-count panel "
        "Observation (as Epic and Oracle Health send panels): read like separate results",
        p,
        {
            A: {"status": "candidate", "inc-platelets": "pass"},
            B: {"status": "candidate", "exc-hemoglobin": "pass", "exc-wbc": "pass"},
        },
    )

    p, r = base("value-strings", gender="female")
    for role, text in (("bili", "<0.2 mg/dL"), ("alb", "4.1 g/dL"), ("ki67", "15%")):
        del r[role]["valueQuantity"]
        r[role]["valueString"] = text
    del r["inr"]["valueQuantity"]
    r["inr"]["valueRatio"] = {"numerator": {"value": 1.0}, "denominator": {"value": 1}}
    hcg = p.lab(
        "2106-3",
        "Choriogonadotropin (pregnancy test) [Presence] in Urine",
        None,
        None,
        "2026-10-28",
    )
    hcg["valueString"] = "Negative"
    scenario(
        "value-strings",
        "results as text and ratios: bilirubin '<0.2 mg/dL' (a bound that settles the limit), "
        "albumin '4.1 g/dL', Ki-67 '15%', INR as a ratio 1.0:1 and a urine hCG 'Negative' for "
        "a woman: all read, a candidate for both",
        p,
        {
            A: {
                "status": "candidate",
                "inc-bilirubin": "pass",
                "inc-albumin": "pass",
                "inc-inr": "pass",
                "inc-grade-2": "pass",
                "exc-pregnancy": "pass",
            },
            B: {"status": "candidate"},
        },
    )

    p, r = base("data-absent")
    del r["plt"]["valueQuantity"]
    r["plt"]["dataAbsentReason"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                "code": "error",
                "display": "Error",
            }
        ]
    }
    scenario(
        "data-absent",
        "a platelet count reported with dataAbsentReason 'error' and no value: unknown, saying why",
        p,
        {A: {"status": "needs-review", "inc-platelets": "unknown"}},
    )

    p, r = base("effective-period-issued")
    bili_day = r["bili"].pop("effectiveDateTime")
    r["bili"]["effectivePeriod"] = {"start": bili_day, "end": bili_day}
    del r["alt"]["effectiveDateTime"]
    r["alt"]["issued"] = "2026-10-20T14:02:00-05:00"
    scenario(
        "effective-period-issued",
        "a bilirubin dated by effectivePeriod and an ALT dated only by issued: both in the "
        "window, a candidate for both",
        p,
        {A: {"status": "candidate", "inc-bilirubin": "pass", "inc-alt": "pass"}},
    )

    p, r = base("same-day-transfusion")
    p.remove(r["plt"])
    before = p.lab(
        "777-3",
        "Platelets",
        60,
        "10*3/uL",
        "2026-10-20T08:10:00-05:00",
        high=400,
        low=150,
        rid="same-day-transfusion-plt-z-before",
    )
    after = p.lab(
        "777-3",
        "Platelets",
        140,
        "10*3/uL",
        "2026-10-20T21:30:00Z",
        high=400,
        low=150,
        rid="same-day-transfusion-plt-a-after",
    )
    del before, after
    scenario(
        "same-day-transfusion",
        "two platelet counts on one day, 60 at 08:10 (UTC-5) and 140 at 21:30 UTC after a "
        "transfusion, with ids that sort the other way: the later one by the instant decides",
        p,
        {A: {"status": "candidate", "inc-platelets": "pass"}},
    )

    p, r = base("lab-units")
    for role, unit, ucum in (
        ("plt", "x10E3/uL", False),
        ("wbc", "G/L", False),
        ("creat", "umol/L", True),
        ("alb", "g/L", True),
    ):
        q = r[role]["valueQuantity"]
        if role == "creat":
            q["value"] = 80
        if role == "alb":
            q["value"] = 40
        q["unit"] = unit
        if ucum:
            q["code"] = unit
        else:
            q.pop("code", None)
            q.pop("system", None)
        r[role].pop("referenceRange", None)
    del r["hb"]["valueQuantity"]["unit"]
    del r["hb"]["valueQuantity"]["code"]
    del r["hb"]["valueQuantity"]["system"]
    scenario(
        "lab-units",
        "units as labs write them (platelets 'x10E3/uL', white cells 'G/L' as giga per litre, "
        "creatinine µmol/L, albumin g/L) are converted; a haemoglobin sent without a unit is "
        "unknown, not a guess",
        p,
        {
            A: {
                "status": "candidate",
                "inc-platelets": "pass",
                "inc-creatinine": "pass",
                "inc-albumin": "pass",
            },
            B: {"status": "needs-review", "exc-wbc": "pass", "exc-hemoglobin": "unknown"},
        },
    )

    p, r = base("grade-other-tumour")
    p.remove(r["ki67"])
    colon = p.condition(
        [(ICD10, "C18.7", "Malignant neoplasm of sigmoid colon")],
        "2015-03-01",
        clinical="resolved",
    )
    colon["abatementDateTime"] = "2016-01-10"
    old_grade = p.coded_obs(
        "21858-6", "Grade Cancer", (SNOMED, "61026006", "G3 grade (finding)"), "2015-03-20"
    )
    old_grade["focus"] = [{"reference": f"Condition/{colon['id']}"}]
    scenario(
        "grade-other-tumour",
        "the only grade on record is a G3 whose focus is a resolved colon cancer: it never "
        "decides the NET's grade, which stays unknown",
        p,
        {
            A: {"status": "needs-review", "inc-grade-2": "unknown"},
            B: {"status": "needs-review", "inc-grade-1-2": "unknown"},
        },
    )

    p, r = base("deceased")
    p.patient["deceasedDateTime"] = "2026-10-28"
    scenario(
        "deceased",
        "an otherwise eligible patient recorded as deceased on 2026-10-28: excluded from both "
        "(the service's living-patient precondition), and no card",
        p,
        {
            A: {"status": "excluded", "inc-living-patient": "fail"},
            B: {"status": "excluded", "inc-living-patient": "fail"},
        },
    )

    p, r = base("birthdate-partial", birth="1968")
    scenario(
        "birthdate-partial",
        "a birth date given as a year only: the age limit is settled (over 18 whatever the "
        "day), the Cockcroft-Gault clearance, which needs the exact age, is unknown",
        p,
        {
            A: {"status": "candidate", "inc-age": "pass"},
            B: {"status": "needs-review", "inc-age": "pass", "exc-renal-function": "unknown"},
        },
    )

    p, r = base("sex-extension")
    p.patient["gender"] = "unknown"
    p.patient["extension"] = [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
            "valueCode": "F",
        }
    ]
    scenario(
        "sex-extension",
        "Patient.gender 'unknown' with the US Core birth-sex extension F: Cockcroft-Gault uses "
        "female and says where it read it",
        p,
        {B: {"status": "candidate", "exc-renal-function": "pass"}},
    )

    p, r = base("pregnancy-status", gender="female", birth="1990-03-02")
    p.coded_obs("82810-3", "Pregnancy status", (LOINC, "LA15173-0", "Pregnant"), "2026-10-25")
    scenario(
        "pregnancy-status",
        "a pregnancy-status observation (LOINC 82810-3) answered 'Pregnant', with no "
        "pregnancy condition or hCG: excluded from both",
        p,
        {
            A: {"status": "excluded", "exc-pregnancy": "fail"},
            B: {"status": "excluded", "exc-pregnancy": "fail"},
        },
    )

    p, r = base("search-outcome-error")
    b = p.bundle("searchset")
    for e in b["entry"]:
        e["search"] = {"mode": "match"}
    b["entry"].append(
        {
            "resource": {
                "resourceType": "OperationOutcome",
                "id": "search-outcome-error-oo",
                "issue": [
                    {
                        "severity": "error",
                        "code": "timeout",
                        "diagnostics": "the Procedure search timed out",
                    }
                ],
            },
            "search": {"mode": "outcome"},
        }
    )
    scenario(
        "search-outcome-error",
        "a searchset whose outcome entry reports an error: what is on record may be "
        "incomplete, so nothing read from it passes or fails (needs review, not a candidate)",
        p,
        {
            A: {
                "status": "needs-review",
                "exc-prior-liver-embolization": "unknown",
                "inc-bilirubin": "unknown",
                "inc-age": "pass",
            },
            B: {"status": "needs-review"},
        },
        bundle=b,
    )

    p, r = base("message-bundle")
    inner = p.bundle("collection")
    message = {
        "resourceType": "Bundle",
        "id": "fixture-message-bundle",
        "type": "message",
        "entry": [
            {
                "fullUrl": "MessageHeader/message-bundle-header",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "message-bundle-header",
                    "eventCoding": {"system": "urn:example:events", "code": "patient-data"},
                    "source": {"endpoint": "urn:example:sender"},
                },
            },
            {"resource": inner},
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-00000000abcd"},
        ],
    }
    scenario(
        "message-bundle",
        "a message Bundle that wraps the patient's Bundle, with one entry that holds no "
        "resource (skipped with a warning): read as the inner Bundle, a candidate for both",
        p,
        {A: {"status": "candidate"}, B: {"status": "candidate"}},
        bundle=message,
    )

    p, r = base("medication-reference")
    medication = {
        "resourceType": "Medication",
        "id": "medication-reference-capecitabine",
        "code": {
            "coding": [
                {"system": RXNORM, "code": "200328", "display": "capecitabine 500 MG Oral Tablet"}
            ]
        },
    }
    p.resources.append(medication)
    p.resources.append(
        {
            "resourceType": "MedicationDispense",
            "id": "medication-reference-dispense",
            "status": "completed",
            "medicationReference": {"reference": "Medication/medication-reference-capecitabine"},
            "subject": {"reference": "Patient/medication-reference"},
            "whenHandedOver": "2026-10-15",
            "daysSupply": {"value": 14, "unit": "day", "system": UCUM, "code": "d"},
        }
    )
    p.resources.append(
        {
            "resourceType": "MedicationRequest",
            "id": "medication-reference-contained",
            "status": "completed",
            "intent": "order",
            "contained": [
                {
                    "resourceType": "Medication",
                    "id": "tmz",
                    "code": {
                        "coding": [{"system": RXNORM, "code": "37776", "display": "temozolomide"}]
                    },
                }
            ],
            "medicationReference": {"reference": "#tmz"},
            "subject": {"reference": "Patient/medication-reference"},
            "authoredOn": "2024-03-01",
        }
    )
    b = p.bundle("searchset")
    for e in b["entry"]:
        # the Medication comes as a searchset's included resource, the rest as matches
        included = e["resource"]["resourceType"] == "Medication"
        e["search"] = {"mode": "include" if included else "match"}
    scenario(
        "medication-reference",
        "a searchset whose capecitabine is a MedicationDispense naming its drug by reference "
        "to a Medication (an included entry), and an older temozolomide order with its "
        "Medication contained: found by every door, the washouts fail",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "excluded", "exc-prior-capecitabine-temozolomide": "fail"},
        },
        bundle=b,
    )

    # Issue 12: drugs coded by brand or by NDC only (cds/criteria/ndc_rxnorm.json).
    p, r = base("xeloda-branded-order")
    p.resources.append(
        {
            "resourceType": "MedicationRequest",
            "id": "xeloda-branded-order-rx1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/xeloda-branded-order"},
            "medicationCodeableConcept": {
                "coding": [
                    {
                        "system": RXNORM,
                        "code": "213293",
                        "display": "capecitabine 500 MG Oral Tablet [Xeloda]",
                    }
                ],
                "text": "Xeloda 500 mg tablet",
            },
            "authoredOn": "2026-10-06",
            "dispenseRequest": {
                "expectedSupplyDuration": {"value": 21, "unit": "days", "system": UCUM, "code": "d"}
            },
        }
    )
    scenario(
        "xeloda-branded-order",
        "Xeloda ordered by its branded-drug RxCUI (213293) on 2026-10-06 for 21 days (last dose "
        "2026-10-26): both washouts fail and prior capecitabine excludes from the pancreatic trial",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {
                "status": "excluded",
                "inc-chemotherapy-washout": "fail",
                "exc-prior-capecitabine-temozolomide": "fail",
            },
        },
    )

    p, r = base("xeloda-ndc-10-digit")
    p.resources.append(
        {
            "resourceType": "MedicationDispense",
            "id": "xeloda-ndc-10-digit-dispense",
            "status": "completed",
            "subject": {"reference": "Patient/xeloda-ndc-10-digit"},
            # no RxNorm coding at all: the pharmacy system sends the label's NDC (4-4-2)
            "medicationCodeableConcept": {
                "coding": [{"system": NDC, "code": "0004-1100-20"}],
                "text": "XELODA 150 MG TABLET",
            },
            "whenHandedOver": "2026-10-15",
            "daysSupply": {"value": 14, "unit": "day", "system": UCUM, "code": "d"},
        }
    )
    scenario(
        "xeloda-ndc-10-digit",
        "Xeloda dispensed 2026-10-15 for 14 days, coded only with its 10-digit NDC "
        "0004-1100-20: read as capecitabine, both washouts fail and prior capecitabine excludes "
        "from the pancreatic trial (no drug on record before NDCs were mapped)",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {
                "status": "excluded",
                "inc-chemotherapy-washout": "fail",
                "exc-prior-capecitabine-temozolomide": "fail",
            },
        },
    )

    p, r = base("xeloda-ndc-11-digit")
    p.resources.append(
        {
            "resourceType": "Medication",
            "id": "xeloda-ndc-11-digit-medication",
            # the 11-digit 5-4-2 billing form of the same package, no hyphens, no display
            "code": {"coding": [{"system": NDC, "code": "00004110020"}]},
        }
    )
    p.resources.append(
        {
            "resourceType": "MedicationAdministration",
            "id": "xeloda-ndc-11-digit-admin",
            "status": "completed",
            "medicationReference": {"reference": "Medication/xeloda-ndc-11-digit-medication"},
            "subject": {"reference": "Patient/xeloda-ndc-11-digit"},
            "effectiveDateTime": "2026-10-20",
        }
    )
    scenario(
        "xeloda-ndc-11-digit",
        "capecitabine given 2026-10-20 as a Medication coded only with the 11-digit NDC "
        "00004110020 (the billing form of 0004-1100-20): both washouts fail",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {
                "status": "excluded",
                "inc-chemotherapy-washout": "fail",
                "exc-prior-capecitabine-temozolomide": "fail",
            },
        },
    )

    p, r = base("temodar-pack")
    p.resources.append(
        {
            "resourceType": "MedicationDispense",
            "id": "temodar-pack-dispense",
            "status": "completed",
            "subject": {"reference": "Patient/temodar-pack"},
            "medicationCodeableConcept": {
                "coding": [{"system": NDC, "code": "0085-1417-02"}],
                "text": "TEMODAR capsules, carton of 5 single-capsule packets",
            },
            "whenHandedOver": "2024-05-10",
            "daysSupply": {"value": 5, "unit": "day", "system": UCUM, "code": "d"},
        }
    )
    scenario(
        "temodar-pack",
        "a Temodar carton of five single-capsule packets dispensed in 2024, coded only with its "
        "NDC 0085-1417-02: prior temozolomide excludes from the pancreatic trial; the washouts "
        "pass (long past)",
        p,
        {
            A: {"status": "candidate", "inc-washout": "pass"},
            B: {
                "status": "excluded",
                "inc-chemotherapy-washout": "pass",
                "exc-prior-capecitabine-temozolomide": "fail",
            },
        },
    )

    # A transaction bundle with urn:uuid references, as an EHR export or a test tool sends.
    p, r = base("transaction-urn-uuid")
    p.med_admin("200328", "capecitabine 500 MG Oral Tablet", "2026-10-20")
    bundle = p.bundle("transaction")
    uuid_of = {}
    for i, e in enumerate(bundle["entry"]):
        key = f"{e['resource']['resourceType']}/{e['resource']['id']}"
        uuid_of[key] = f"urn:uuid:00000000-0000-4000-8000-{i:012d}"
    for entry in bundle["entry"]:
        res = entry["resource"]
        entry["fullUrl"] = uuid_of[f"{res['resourceType']}/{res['id']}"]
        entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
        if "subject" in res:
            res["subject"]["reference"] = uuid_of[res["subject"]["reference"]]
    scenario(
        "transaction-urn-uuid",
        "a transaction bundle whose references are urn:uuid "
        "fullUrls: resolved, and recent capecitabine found",
        p,
        {
            A: {"status": "excluded", "inc-washout": "fail"},
            B: {"status": "excluded", "exc-prior-capecitabine-temozolomide": "fail"},
        },
        bundle=bundle,
    )

    # Two patients in one searchset bundle.
    p1, _ = base("searchset-first")
    p2, r2 = base("searchset-second")
    p2.remove(r2["pnet"])
    p2.remove(r2["liver"])
    b = p1.bundle("searchset")
    b["entry"] += p2.bundle("searchset")["entry"]
    for e in b["entry"]:
        e["search"] = {"mode": "match"}
    b["id"] = "fixture-searchset-two-patients"
    scenario(
        "searchset-two-patients",
        "a searchset bundle holding two patients: the first a "
        "candidate for both, the second without a NET",
        p1,
        {A: {"status": "candidate"}, B: {"status": "candidate"}},
        bundle=b,
    )


def _first_patient(bundle: dict[str, Any]) -> str:
    for entry in bundle["entry"]:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            return str(resource["id"])
        if resource.get("resourceType") == "Bundle":
            return _first_patient(resource)
    raise ValueError(f"no Patient in {bundle['id']}")


def main() -> None:
    build()
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    expectations = {}
    lines = [
        "# FHIR fixtures",
        "",
        "Small synthetic FHIR R4 bundles, one clinical scenario each, written by",
        "`scripts/build_fixtures.py` (edit the script, not the files). Every patient is",
        "fictional. Each scenario starts from one eligible patient and changes only what it is",
        f"about; expectations hold on the as-of date {AS_OF} and are checked by",
        "`tests/test_fixture_scenarios.py` (`tests/fixture_expectations.json`). Ids are stable:",
        "the fixtures",
        "loader PUTs them to a FHIR server under the same ids.",
        "",
        "| file | what it exercises |",
        "|---|---|",
    ]
    for s in SCENARIOS:
        name = f"{s['key']}.json"
        with open(OUT / name, "w", encoding="utf-8") as f:
            json.dump(s["bundle"], f, indent=1, ensure_ascii=False)
            f.write("\n")
        first_patient = _first_patient(s["bundle"])
        expectations[name] = {
            "as_of": AS_OF,
            "patient": f"Patient/{first_patient}",
            "trials": copy.deepcopy(s["expected"]),
        }
        lines.append(f"| `{name}` | {s['about']} |")
    with open(ROOT / "tests" / "fixture_expectations.json", "w", encoding="utf-8") as f:
        json.dump(expectations, f, indent=1)
        f.write("\n")
    with open(OUT / "README.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
