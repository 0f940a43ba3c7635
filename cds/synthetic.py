"""A reproducible synthetic FHIR R4 population: ordinary patients plus a share of NET cases."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TextIO

from cds.criteria.reads import RECORD_TYPES
from cds.errors import InputError

JSONDict = dict[str, Any]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

#: the date the population is built around (the tests' fixed --as-of)
ANCHOR = date(2026, 11, 1)
#: every n-th patient is a NET case by default (5 %)
DEFAULT_NET_EVERY = 20

# The ordinary "noise": well-known codes seen in everyday EHR data (the LOINC vital signs named
# in the issue, and codes from the Synthea sample in shared/data). None of them is in a value
# set the trials read, except body weight, which a real record has anyway.
# (code, display, unit, low, high, decimals)
Panel = tuple[tuple[str, str, str, float, float, int], ...]
_VITALS: Panel = (
    ("8867-4", "Heart rate", "/min", 55, 100, 0),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 105, 160, 0),
    ("8462-4", "Diastolic blood pressure", "mm[Hg]", 60, 95, 0),
    ("8302-2", "Body height", "cm", 150, 195, 1),
    ("29463-7", "Body weight", "kg", 50, 110, 1),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 19, 35, 1),
)
_METABOLIC: Panel = (
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70, 140, 0),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 140, 260, 0),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 60, 220, 0),
    ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 35, 80, 0),
    (
        "18262-6",
        "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
        60,
        180,
        0,
    ),
    ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7, 22, 0),
    ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 8.6, 10.3, 1),
)
# Routine liver, kidney and blood counts (codes from the project's value sets): normal values.
# (code, display, unit, low, high, decimals, ref_low, ref_high)
_ROUTINE_LABS: tuple[tuple[str, str, str, float, float, int, float, float], ...] = (
    ("1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL", 0.3, 1.1, 1, 0.1, 1.2),
    (
        "1742-6",
        "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        10,
        38,
        0,
        7,
        40,
    ),
    (
        "1920-8",
        "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        12,
        38,
        0,
        10,
        40,
    ),
    ("1751-7", "Albumin [Mass/volume] in Serum or Plasma", "g/dL", 3.6, 4.9, 1, 3.5, 5.0),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.7, 1.2, 2, 0.7, 1.3),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 160, 380, 0, 150, 400),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.5, 16.5, 1, 12.0, 17.5),
    (
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        4.2,
        10.5,
        1,
        4.0,
        11.0,
    ),
)
_NOISE_CONDITIONS = (
    ("444814009", "Viral sinusitis (disorder)"),
    ("195662009", "Acute viral pharyngitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
    ("40055000", "Chronic sinusitis (disorder)"),
    ("38341003", "Hypertension"),
    ("55822004", "Hyperlipidemia"),
    ("15777000", "Prediabetes"),
    ("239873007", "Osteoarthritis of knee"),
    ("44465007", "Sprain of ankle"),
)
_NOISE_PROCEDURES = (
    ("73761001", "Colonoscopy"),
    ("399208008", "Plain chest X-ray"),
    ("127783003", "Spirometry (procedure)"),
    ("117015009", "Throat culture (procedure)"),
    ("312681000", "Bone density scan (procedure)"),
    ("410006001", "Digital examination of rectum"),
)
_NOISE_MEDICATIONS = (
    ("316672", "Simvastatin 10 MG Oral Tablet"),
    ("313782", "Acetaminophen 325 MG Oral Tablet"),
    ("316049", "Hydrochlorothiazide 25 MG Oral Tablet"),
    ("849574", "Naproxen sodium 220 MG Oral Tablet"),
    ("310965", "Ibuprofen 200 MG Oral Tablet"),
    ("562251", "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet"),
)
_GIVEN = ("Alex", "Sam", "Maria", "Jon", "Aiko", "Lena", "Omar", "Rita", "Tom", "Ines", "Kofi")
_FAMILY = ("Synth", "Moreau", "Okafor", "Silva", "Novak", "Tanaka", "Berg", "Costa", "Haddad")

#: order of resource types in bundles and NDJSON: the order records present them in
TYPE_ORDER = RECORD_TYPES


class PatientBuilder:
    """One patient's resources under construction, with ids derived from the patient id."""

    def __init__(self, pid: str, rng: random.Random, anchor: date) -> None:
        self.pid = pid
        self.rng = rng
        self.anchor = anchor
        self.resources: list[JSONDict] = []
        self._n = 0
        age = rng.randint(30, 85)
        birth = anchor - timedelta(days=age * 365 + rng.randint(0, 364))
        self.patient: JSONDict = {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"family": rng.choice(_FAMILY), "given": [rng.choice(_GIVEN)]}],
            "gender": rng.choice(("male", "female")),
            "birthDate": birth.isoformat(),
        }

    def day(self, days_before: int) -> str:
        return (self.anchor - timedelta(days=days_before)).isoformat()

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{self.pid}-{prefix}{self._n}"

    def _subject(self) -> dict[str, str]:
        return {"reference": f"Patient/{self.pid}"}

    def condition(
        self, codings: list[tuple[str, str, str]], onset: str, *, clinical: str = "active"
    ) -> JSONDict:
        r: JSONDict = {
            "resourceType": "Condition",
            "id": self._id("c"),
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": clinical}]},
            "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
            "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]},
            "subject": self._subject(),
            "onsetDateTime": onset,
        }
        self.resources.append(r)
        return r

    def quantity(
        self,
        code: str,
        display: str,
        value: float,
        unit: str,
        when: str,
        *,
        category: str = "laboratory",
        low: float | None = None,
        high: float | None = None,
    ) -> JSONDict:
        r: JSONDict = {
            "resourceType": "Observation",
            "id": self._id("o"),
            "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": self._subject(),
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }
        if low is not None or high is not None:
            rr: JSONDict = {}
            if low is not None:
                rr["low"] = {"value": low, "unit": unit, "system": UCUM, "code": unit}
            if high is not None:
                rr["high"] = {"value": high, "unit": unit, "system": UCUM, "code": unit}
            r["referenceRange"] = [rr]
        self.resources.append(r)
        return r

    def coded(self, code: str, display: str, answer: tuple[str, str, str], when: str) -> JSONDict:
        r: JSONDict = {
            "resourceType": "Observation",
            "id": self._id("o"),
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": self._subject(),
            "effectiveDateTime": when,
            "valueCodeableConcept": {
                "coding": [{"system": answer[0], "code": answer[1], "display": answer[2]}]
            },
        }
        self.resources.append(r)
        return r

    def procedure(self, system: str, code: str, display: str, when: str) -> JSONDict:
        r: JSONDict = {
            "resourceType": "Procedure",
            "id": self._id("p"),
            "status": "completed",
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "subject": self._subject(),
            "performedDateTime": when,
        }
        self.resources.append(r)
        return r

    def medication(self, rtype: str, rxcui: str, display: str, when: str) -> JSONDict:
        r: JSONDict = {
            "resourceType": rtype,
            "id": self._id("m"),
            "medicationCodeableConcept": {
                "coding": [{"system": RXNORM, "code": rxcui, "display": display}]
            },
            "subject": self._subject(),
        }
        if rtype == "MedicationRequest":
            r.update(status="completed", intent="order", authoredOn=when)
        elif rtype == "MedicationAdministration":
            r.update(status="completed", effectiveDateTime=when)
        else:
            r.update(status="completed", effectivePeriod={"start": when})
        self.resources.append(r)
        return r

    def remove(self, resource: JSONDict) -> None:
        self.resources.remove(resource)

    def ordered(self) -> list[JSONDict]:
        """The Patient, then its resources grouped by type in TYPE_ORDER (stable within one)."""
        rank = {t: i for i, t in enumerate(TYPE_ORDER)}
        body = sorted(self.resources, key=lambda r: rank.get(r["resourceType"], len(rank)))
        return [self.patient, *body]


# -- ordinary history ---------------------------------------------------------------------


def add_noise(
    p: PatientBuilder,
    *,
    visits: int | None = None,
    conditions: int | None = None,
    procedures: int | None = None,
    medications: int | None = None,
) -> None:
    """Everyday history: visits with vital signs and labs, problems, procedures, prescriptions."""
    rng = p.rng
    visits = rng.randint(3, 16) if visits is None else visits
    for _ in range(visits):
        when = p.day(rng.randint(1, 5 * 365))
        for code, display, unit, lo, hi, dec in _VITALS:
            p.quantity(
                code, display, round(rng.uniform(lo, hi), dec), unit, when, category="vital-signs"
            )
        if rng.random() < 0.5:
            for code, display, unit, lo, hi, dec in _METABOLIC:
                p.quantity(code, display, round(rng.uniform(lo, hi), dec), unit, when)
        if rng.random() < 0.3:
            for code, display, unit, lo, hi, dec, rlo, rhi in _ROUTINE_LABS:
                p.quantity(
                    code, display, round(rng.uniform(lo, hi), dec), unit, when, low=rlo, high=rhi
                )
    for _ in range(rng.randint(1, 5) if conditions is None else conditions):
        code, display = rng.choice(_NOISE_CONDITIONS)
        p.condition(
            [(SNOMED, code, display)],
            p.day(rng.randint(30, 10 * 365)),
            clinical=rng.choice(("active", "resolved")),
        )
    for _ in range(rng.randint(0, 4) if procedures is None else procedures):
        code, display = rng.choice(_NOISE_PROCEDURES)
        p.procedure(SNOMED, code, display, p.day(rng.randint(30, 8 * 365)))
    for _ in range(rng.randint(0, 5) if medications is None else medications):
        code, display = rng.choice(_NOISE_MEDICATIONS)
        p.medication("MedicationRequest", code, display, p.day(rng.randint(1, 5 * 365)))


# -- NET cases ----------------------------------------------------------------------------

PNET = [
    (ICD10, "C25.4", "Malignant neoplasm of endocrine pancreas"),
    (SNOMED, "735735001", "Primary malignant neuroendocrine neoplasm of pancreas (disorder)"),
]
LIVER_METS = [(ICD10, "C7B.02", "Secondary carcinoid tumors of liver")]
ILEAL_NET = [(ICD10, "C7A.012", "Malignant carcinoid tumor of the ileum")]

Roles = dict[str, JSONDict]


def net_base(p: PatientBuilder) -> Roles:
    """A pancreatic NET, G2 by Ki-67, with liver metastases and recent normal labs: a candidate
    for both trials on the anchor date. Returns the resources by role, for variants to change."""
    p.patient["birthDate"] = "1968-05-14"
    lab = p.day(12)
    r: Roles = {}
    r["pnet"] = p.condition(PNET, p.day(363))
    r["liver"] = p.condition(LIVER_METS, p.day(363))
    r["ki67"] = p.quantity("29593-1", "Ki-67 index", 8, "%", p.day(356))
    r["bili"] = p.quantity("1975-2", "Bilirubin.total", 0.8, "mg/dL", lab, low=0.1, high=1.2)
    r["alt"] = p.quantity("1742-6", "ALT", 35, "U/L", lab, low=7, high=40)
    r["ast"] = p.quantity("1920-8", "AST", 30, "U/L", lab, low=10, high=40)
    r["alb"] = p.quantity("1751-7", "Albumin", 4.0, "g/dL", lab, low=3.5, high=5.0)
    r["plt"] = p.quantity("777-3", "Platelets", 210, "10*3/uL", lab, low=150, high=400)
    r["creat"] = p.quantity("2160-0", "Creatinine", 0.9, "mg/dL", lab, low=0.7, high=1.3)
    r["inr"] = p.quantity("6301-6", "INR", 1.0, "{INR}", lab, low=0.9, high=1.1)
    r["pt"] = p.quantity("5902-2", "Prothrombin time", 12.0, "s", lab, low=11.0, high=13.5)
    r["hb"] = p.quantity("718-7", "Hemoglobin", 13.5, "g/dL", lab, low=13.0, high=17.5)
    r["wbc"] = p.quantity("6690-2", "Leukocytes", 6.2, "10*3/uL", lab, low=4.0, high=11.0)
    r["weight"] = p.quantity("29463-7", "Body weight", 80, "kg", lab, category="vital-signs")
    r["ecog"] = p.coded(
        "89247-1",
        "ECOG performance status",
        (LOINC, "LA9623-5", "Restricted in physically strenuous activity"),
        p.day(7),
    )
    return r


def _set(role: str, value: float) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        r[role]["valueQuantity"]["value"] = value

    return change


def _both(
    *changes: Callable[[PatientBuilder, Roles], None],
) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        for one in changes:
            one(p, r)

    return change


def _drop(*roles: str) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        for role in roles:
            p.remove(r[role])

    return change


def _add_condition(
    code: list[tuple[str, str, str]], days: int = 200
) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        p.condition(code, p.day(days))

    return change


def _allergy(code: tuple[str, str, str]) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        system, value, display = code
        p.resources.append(
            {
                "resourceType": "AllergyIntolerance",
                "id": p._id("a"),
                "patient": p._subject(),
                "code": {"coding": [{"system": system, "code": value, "display": display}]},
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/"
                            "allergyintolerance-clinical",
                            "code": "active",
                        }
                    ]
                },
                "recordedDate": p.day(700),
            }
        )

    return change


def _other_study(p: PatientBuilder, r: Roles) -> None:
    p.resources.append(
        {
            "resourceType": "ResearchSubject",
            "id": p._id("rs"),
            "status": "on-study-intervention",
            "period": {"start": p.day(40)},
            "study": {"display": "An investigational agent study (generated)"},
            "individual": p._subject(),
        }
    )


def _net_in_words(p: PatientBuilder, r: Roles) -> None:
    """The NET written only as problem-list text (no code)."""
    p.remove(r["pnet"])
    p.resources.append(
        {
            "resourceType": "Condition",
            "id": p._id("c"),
            "subject": p._subject(),
            "code": {"text": "Pancreatic neuroendocrine tumour"},
            "onsetDateTime": p.day(396),
        }
    )


def _non_net(p: PatientBuilder, r: Roles) -> None:
    _drop("pnet", "liver", "ki67")(p, r)


def _ileal(p: PatientBuilder, r: Roles) -> None:
    p.remove(r["pnet"])
    p.condition(ILEAL_NET, p.day(396))


def _grade1(p: PatientBuilder, r: Roles) -> None:
    p.remove(r["ki67"])
    p.coded("21858-6", "Grade Cancer", (SNOMED, "54102005", "G1 grade (finding)"), p.day(356))


def _stale_labs(p: PatientBuilder, r: Roles) -> None:
    for role in ("bili", "alt", "ast", "alb", "plt", "creat", "inr", "pt", "hb", "wbc"):
        r[role]["effectiveDateTime"] = p.day(92)


def _ecog(code: str, display: str) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        r["ecog"]["valueCodeableConcept"]["coding"] = [
            {"system": LOINC, "code": code, "display": display}
        ]

    return change


def _recent_capecitabine(p: PatientBuilder, r: Roles) -> None:
    p.medication("MedicationAdministration", "200328", "capecitabine 500 MG Oral Tablet", p.day(12))


def _old_temozolomide(p: PatientBuilder, r: Roles) -> None:
    p.medication("MedicationStatement", "37776", "temozolomide", p.day(400))


def _procedure(
    system: str, code: str, display: str, days: int
) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        p.procedure(system, code, display, p.day(days))

    return change


def _too_young(p: PatientBuilder, r: Roles) -> None:
    p.patient["birthDate"] = (p.anchor - timedelta(days=17 * 365)).isoformat()


def _no_birth_date(p: PatientBuilder, r: Roles) -> None:
    del p.patient["birthDate"]


def _deceased(p: PatientBuilder, r: Roles) -> None:
    p.patient["deceasedDateTime"] = p.day(30)


def _pregnant(p: PatientBuilder, r: Roles) -> None:
    p.patient["gender"] = "female"
    p.patient["birthDate"] = "1990-03-02"
    p.condition([(SNOMED, "77386006", "Pregnancy (finding)")], p.day(60))


def _diabetes(glucose: float | None) -> Callable[[PatientBuilder, Roles], None]:
    def change(p: PatientBuilder, r: Roles) -> None:
        p.condition([(SNOMED, "44054006", "Diabetes mellitus type 2 (disorder)")], p.day(2000))
        if glucose is not None:
            p.quantity("1558-6", "Fasting glucose", glucose, "mg/dL", p.day(12), low=70, high=99)

    return change


#: each NET variant changes the eligible base in one way, so that together they reach every
#: computable criterion's pass and fail/unknown in both trials
NET_VARIANTS: tuple[tuple[str, Callable[[PatientBuilder, Roles], None]], ...] = (
    ("both-candidate", lambda p, r: None),
    ("non-net", _non_net),
    ("ileal-net", _ileal),
    ("grade-unrecorded", _drop("ki67")),
    ("grade-1", _grade1),
    ("grade-3-ki67", _set("ki67", 35)),
    ("no-liver-metastases", _drop("liver")),
    ("stale-labs", _stale_labs),
    ("bilirubin-2.5", _set("bili", 2.5)),
    ("bilirubin-3.5", _set("bili", 3.5)),
    ("alt-6x", _set("alt", 250)),
    ("ast-6x", _set("ast", 260)),
    ("albumin-2.2", _set("alb", 2.2)),
    ("platelets-60", _set("plt", 60)),
    ("creatinine-2.5", _set("creat", 2.5)),
    ("inr-1.8", _set("inr", 1.8)),
    ("inr-1.8-pt-long", _both(_set("inr", 1.8), _set("pt", 16.0))),
    ("albumin-2.8-pt-long", _both(_set("alb", 2.8), _set("pt", 16.0))),
    ("hemoglobin-7", _set("hb", 7.1)),
    ("wbc-1.5", _set("wbc", 1.5)),
    ("no-weight", _drop("weight")),
    ("ecog-3", _ecog("LA9625-0", "Capable of only limited selfcare")),
    ("no-ecog", _drop("ecog")),
    ("recent-capecitabine", _recent_capecitabine),
    ("prior-temozolomide", _old_temozolomide),
    ("recent-radiotherapy", _procedure(CPT, "77385", "IMRT delivery, simple", 15)),
    (
        "liver-embolization",
        _procedure(SNOMED, "314617008", "Chemoembolization of liver metastases", 500),
    ),
    ("embolization-site-unknown", _procedure(CPT, "37243", "Vascular embolization/occlusion", 500)),
    ("biliary-stent", _procedure(CPT, "43274", "ERCP with biliary stent placement", 420)),
    ("cirrhosis", _add_condition([(SNOMED, "19943007", "Cirrhosis of liver (disorder)")], 600)),
    ("ascites", _add_condition([(ICD10, "R18.8", "Other ascites")], 60)),
    (
        "brain-metastases",
        _add_condition([(ICD10, "C79.31", "Secondary malignant neoplasm of brain")], 180),
    ),
    (
        "heart-failure",
        _add_condition([(SNOMED, "88805009", "Chronic congestive heart failure (disorder)")], 900),
    ),
    (
        "urinary-incontinence",
        _add_condition([(ICD10, "R32", "Unspecified urinary incontinence")], 600),
    ),
    ("portal-vein-thrombosis", _add_condition([(ICD10, "I81", "Portal vein thrombosis")], 90)),
    ("fluorouracil-allergy", _allergy((RXNORM, "4492", "Fluorouracil"))),
    ("contrast-allergy", _allergy((SNOMED, "426722004", "Iodinated contrast media (substance)"))),
    (
        "other-malignancy",
        _add_condition(
            [(ICD10, "C50.911", "Malignant neoplasm of unspecified site of right female breast")],
            200,
        ),
    ),
    ("diabetes-uncontrolled", _diabetes(260)),
    ("diabetes-controlled", _diabetes(95)),
    ("diabetes-no-glucose", _diabetes(None)),
    ("pregnant", _pregnant),
    ("age-17", _too_young),
    ("no-birth-date", _no_birth_date),
    ("deceased", _deceased),
    ("other-study", _other_study),
    ("net-in-words", _net_in_words),
)


# -- the population -----------------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """What to generate: N patients from a seed; every ``net_every``-th one a NET case."""

    patients: int
    seed: int = 0
    net_every: int = DEFAULT_NET_EVERY
    anchor: date = ANCHOR
    id_prefix: str = "syn"
    #: visits per ordinary history (each: 6 vital signs, often a lab panel): the volume knob
    visits: tuple[int, int] = (3, 16)

    def patient_id(self, index: int) -> str:
        return f"{self.id_prefix}-{self.seed}-{index:07d}"

    def variant(self, index: int) -> str | None:
        """The NET variant of patient ``index``, or None for an ordinary patient."""
        if self.net_every <= 0 or index % self.net_every != 0:
            return None
        return NET_VARIANTS[(index // self.net_every) % len(NET_VARIANTS)][0]

    def patient(self, index: int) -> list[JSONDict]:
        """Patient ``index``'s resources: the same for a given seed whatever N is."""
        # A string seed is hashed with SHA-512 by random.seed: stable across processes and
        # PYTHONHASHSEED, so patient i is the same in every run and every worker.
        rng = random.Random(f"{self.seed}:{index}")  # noqa: S311 - test data, not secrets
        p = PatientBuilder(self.patient_id(index), rng, self.anchor)
        add_noise(p, visits=rng.randint(*self.visits))
        variant = self.variant(index)
        if variant is not None:
            change = dict(NET_VARIANTS)[variant]
            change(p, net_base(p))
        return p.ordered()

    def __iter__(self) -> Iterator[list[JSONDict]]:
        for index in range(self.patients):
            yield self.patient(index)


def big_patient(
    *,
    observations: int = 2000,
    conditions: int = 200,
    procedures: int = 100,
    medications: int = 100,
    seed: int = 0,
    anchor: date = ANCHOR,
) -> list[JSONDict]:
    """One NET patient (a candidate for both trials) with a very long record, for benchmarks:
    exactly the numbers of Observations, Conditions, Procedures and medication resources given."""
    rng = random.Random(f"big:{seed}")  # noqa: S311 - test data
    p = PatientBuilder(f"big-{seed}", rng, anchor)
    net_base(p)
    counts = {t: sum(1 for r in p.resources if r["resourceType"] == t) for t in TYPE_ORDER}
    add_noise(
        p,
        visits=0,
        conditions=conditions - counts["Condition"],
        procedures=procedures - counts["Procedure"],
        medications=0,
    )
    rtypes = ("MedicationRequest", "MedicationStatement", "MedicationAdministration")
    for i in range(medications):
        code, display = rng.choice(_NOISE_MEDICATIONS)
        p.medication(rtypes[i % 3], code, display, p.day(rng.randint(30, 5 * 365)))
    # Vital-sign and metabolic panels until the Observation count is reached exactly.
    panel = [(c, d, u, lo, hi, dec) for c, d, u, lo, hi, dec in _VITALS + _METABOLIC]
    have = sum(1 for r in p.resources if r["resourceType"] == "Observation")
    for i in range(observations - have):
        code, display, unit, lo, hi, dec = panel[i % len(panel)]
        p.quantity(
            code,
            display,
            round(rng.uniform(lo, hi), dec),
            unit,
            p.day(1 + (i // len(panel)) % (5 * 365)),
        )
    return p.ordered()


def as_bundle(resources: list[JSONDict], bundle_id: str | None = None) -> JSONDict:
    """A collection Bundle of one patient's resources (the input `cds evaluate` takes)."""
    bundle: JSONDict = {"resourceType": "Bundle", "type": "collection"}
    if bundle_id:
        bundle["id"] = bundle_id
    bundle["entry"] = [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in resources
    ]
    return bundle


def write_population(population: Population, out: Path, fmt: str) -> int:
    """Write the population as one Bundle file per patient or as NDJSON files per type;
    streams patient by patient, so memory stays flat. Returns the number of resources."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    if fmt == "bundles":
        for resources in population:
            pid = resources[0]["id"]
            path = out / f"{pid}.json"
            path.write_text(dumps(as_bundle(resources, f"bundle-{pid}")) + "\n", encoding="utf-8")
            count += len(resources)
        return count
    if fmt != "ndjson":
        raise InputError(f"unknown format {fmt!r} (bundles or ndjson)", source="--format")
    files: dict[str, TextIO] = {}
    with ExitStack() as stack:
        for resources in population:
            for r in resources:
                rtype = r["resourceType"]
                f = files.get(rtype)
                if f is None:
                    path = out / f"{rtype}.ndjson"
                    f = files[rtype] = stack.enter_context(open(path, "w", encoding="utf-8"))
                f.write(dumps(r) + "\n")
            count += len(resources)
    return count


# -- CLI --------------------------------------------------------------------------------------


def _generate_command(args: argparse.Namespace) -> int:
    if args.patients < 1:
        raise InputError("must be at least 1", source="--patients")
    population = Population(args.patients, seed=args.seed, net_every=args.net_every)
    count = write_population(population, args.out, args.format)
    net = sum(1 for i in range(args.patients) if population.variant(i) is not None)
    sys.stdout.write(
        f"wrote {args.patients} patients ({net} NET cases), {count} resources, "
        f"as {args.format} to {args.out}\n"
    )
    return 0


def register(subparsers: Any, fixtures_subparsers: Any) -> None:
    """Add ``cds fixtures generate``."""
    parser = fixtures_subparsers.add_parser(
        "generate",
        help="write a reproducible synthetic population (bundles or NDJSON)",
        description="Generate N synthetic patients with realistic record volumes: ordinary "
        "patients, and every n-th one a NET case built to reach a particular criterion outcome. "
        "The same seed gives the same population.",
    )
    parser.add_argument("--patients", type=int, required=True, metavar="N")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--format", choices=("bundles", "ndjson"), default="ndjson")
    parser.add_argument(
        "--net-every",
        type=int,
        default=DEFAULT_NET_EVERY,
        metavar="K",
        help=f"every K-th patient is a NET case (default {DEFAULT_NET_EVERY}; 0 for none)",
    )
    parser.set_defaults(func=_generate_command)
