"""Vocabulary of each simulated medical specialty, used by ``simulation.notes``.

Words are written out in full ("twice daily", "hypertension"); sites whose
style abbreviates rewrite them with ``ABBREVIATIONS``. Every value is a tuple,
so iteration order, and with it the generated text, is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocabulary:
    """What notes of one specialty talk about."""

    complaints: tuple[str, ...]
    conditions: tuple[str, ...]
    medications: tuple[str, ...]
    tests: tuple[str, ...]
    findings: tuple[str, ...]
    procedures: tuple[str, ...]
    pediatric: bool = False


VOCABULARY: dict[str, Vocabulary] = {
    "cardiology": Vocabulary(
        complaints=(
            "chest pain",
            "shortness of breath",
            "palpitations",
            "leg swelling",
            "dizziness",
            "fatigue on exertion",
        ),
        conditions=(
            "hypertension",
            "atrial fibrillation",
            "coronary artery disease",
            "heart failure",
            "aortic stenosis",
            "hyperlipidemia",
        ),
        medications=(
            "metoprolol 25 mg twice daily",
            "lisinopril 10 mg daily",
            "atorvastatin 40 mg at bedtime",
            "apixaban 5 mg twice daily",
            "furosemide 40 mg daily",
            "aspirin 81 mg daily",
        ),
        tests=("ECG", "echocardiogram", "troponin", "stress test", "lipid panel", "Holter monitor"),
        findings=(
            "an irregular rhythm",
            "a systolic murmur",
            "bilateral ankle edema",
            "elevated jugular venous pressure",
            "clear lungs",
            "a regular rate and rhythm",
        ),
        procedures=("cardiac catheterization", "cardioversion", "pacemaker check", "cardiac rehabilitation"),
    ),
    "oncology": Vocabulary(
        complaints=("weight loss", "night sweats", "fatigue", "a breast lump", "persistent cough", "bone pain"),
        conditions=(
            "breast cancer",
            "lung adenocarcinoma",
            "colon cancer",
            "lymphoma",
            "prostate cancer",
            "anemia of chronic disease",
        ),
        medications=(
            "tamoxifen 20 mg daily",
            "ondansetron 8 mg as needed",
            "dexamethasone 4 mg daily",
            "capecitabine 1000 mg twice daily",
            "oxycodone 5 mg as needed",
            "letrozole 2.5 mg daily",
        ),
        tests=(
            "CT chest abdomen pelvis",
            "PET scan",
            "complete blood count",
            "tumor markers",
            "core biopsy",
            "bone scan",
        ),
        findings=(
            "a palpable axillary node",
            "mild pallor",
            "a healed port site",
            "no hepatomegaly",
            "stable weight",
            "a firm breast mass",
        ),
        procedures=("the next chemotherapy cycle", "radiation therapy", "port placement", "tumor board review"),
    ),
    "pediatrics": Vocabulary(
        complaints=("fever", "ear pain", "cough", "rash", "poor feeding", "vomiting"),
        conditions=(
            "otitis media",
            "viral upper respiratory infection",
            "asthma",
            "bronchiolitis",
            "eczema",
            "gastroenteritis",
        ),
        medications=(
            "amoxicillin 400 mg twice daily",
            "acetaminophen 160 mg as needed",
            "ibuprofen 100 mg as needed",
            "albuterol 2 puffs as needed",
            "hydrocortisone cream twice daily",
            "oral rehydration solution as needed",
        ),
        tests=("rapid strep test", "urinalysis", "chest x-ray", "growth chart review", "hearing screen", "RSV swab"),
        findings=(
            "a bulging tympanic membrane",
            "mild wheezing",
            "a red throat",
            "dry skin patches",
            "good hydration",
            "normal growth",
        ),
        procedures=("vaccinations", "developmental screening", "a well child visit", "a nebulizer treatment"),
        pediatric=True,
    ),
    "neurology": Vocabulary(
        complaints=("headache", "numbness", "weakness in one arm", "memory problems", "tremor", "seizures"),
        conditions=(
            "migraine",
            "epilepsy",
            "Parkinson disease",
            "multiple sclerosis",
            "peripheral neuropathy",
            "transient ischemic attack",
        ),
        medications=(
            "levetiracetam 500 mg twice daily",
            "sumatriptan 50 mg as needed",
            "carbidopa levodopa 25/100 three times daily",
            "gabapentin 300 mg at bedtime",
            "topiramate 25 mg daily",
            "donepezil 10 mg daily",
        ),
        tests=("MRI brain", "EEG", "nerve conduction study", "CT head", "lumbar puncture", "carotid ultrasound"),
        findings=(
            "a resting tremor",
            "decreased sensation in both feet",
            "normal cranial nerves",
            "brisk reflexes",
            "an unsteady gait",
            "a mild left arm drift",
        ),
        procedures=("botulinum toxin injection", "physical therapy", "a sleep study", "neuropsychological testing"),
    ),
    "orthopedics": Vocabulary(
        complaints=("knee pain", "back pain", "shoulder pain", "hip pain", "ankle swelling", "wrist pain after a fall"),
        conditions=(
            "osteoarthritis",
            "rotator cuff tear",
            "meniscal tear",
            "lumbar disc herniation",
            "distal radius fracture",
            "ankle sprain",
        ),
        medications=(
            "naproxen 500 mg twice daily",
            "meloxicam 15 mg daily",
            "acetaminophen 1000 mg three times daily",
            "cyclobenzaprine 10 mg at bedtime",
            "tramadol 50 mg as needed",
            "diclofenac gel four times daily",
        ),
        tests=(
            "x-ray of the knee",
            "MRI shoulder",
            "x-ray lumbar spine",
            "CT wrist",
            "bone density scan",
            "joint ultrasound",
        ),
        findings=(
            "a joint effusion",
            "reduced range of motion",
            "tenderness over the joint line",
            "a positive straight leg raise",
            "intact distal pulses",
            "mild crepitus",
        ),
        procedures=("corticosteroid injection", "arthroscopy", "total knee replacement", "cast application"),
    ),
    "pulmonology": Vocabulary(
        complaints=(
            "chronic cough",
            "wheezing",
            "shortness of breath",
            "chest tightness",
            "sputum production",
            "loud snoring",
        ),
        conditions=(
            "chronic obstructive pulmonary disease",
            "asthma",
            "obstructive sleep apnea",
            "pulmonary fibrosis",
            "pneumonia",
            "pulmonary embolism",
        ),
        medications=(
            "tiotropium 18 mcg daily",
            "fluticasone salmeterol 250/50 twice daily",
            "albuterol 2 puffs as needed",
            "prednisone 40 mg daily",
            "azithromycin 250 mg daily",
            "montelukast 10 mg at bedtime",
        ),
        tests=(
            "pulmonary function tests",
            "chest CT",
            "six minute walk test",
            "arterial blood gas",
            "sputum culture",
            "overnight oximetry",
        ),
        findings=(
            "scattered wheezes",
            "diminished breath sounds",
            "bibasilar crackles",
            "oxygen saturation of 91 percent on room air",
            "prolonged expiration",
            "no accessory muscle use",
        ),
        procedures=("bronchoscopy", "pulmonary rehabilitation", "CPAP titration", "home oxygen evaluation"),
    ),
    "endocrinology": Vocabulary(
        complaints=(
            "increased thirst",
            "weight gain",
            "fatigue",
            "heat intolerance",
            "frequent urination",
            "neck swelling",
        ),
        conditions=(
            "type 2 diabetes",
            "hypothyroidism",
            "hyperthyroidism",
            "osteoporosis",
            "obesity",
            "adrenal insufficiency",
        ),
        medications=(
            "metformin 1000 mg twice daily",
            "levothyroxine 75 mcg daily",
            "insulin glargine 20 units at bedtime",
            "semaglutide 0.5 mg weekly",
            "methimazole 10 mg daily",
            "alendronate 70 mg weekly",
        ),
        tests=("hemoglobin A1c", "TSH", "free T4", "thyroid ultrasound", "fasting glucose", "cortisol level"),
        findings=(
            "an enlarged thyroid",
            "acanthosis nigricans",
            "a fine tremor of the hands",
            "decreased foot sensation",
            "a normal thyroid exam",
            "a body mass index of 34",
        ),
        procedures=(
            "diabetes education",
            "continuous glucose monitor placement",
            "fine needle aspiration",
            "dietitian referral",
        ),
    ),
    "gastroenterology": Vocabulary(
        complaints=("abdominal pain", "heartburn", "diarrhea", "constipation", "rectal bleeding", "nausea"),
        conditions=(
            "gastroesophageal reflux disease",
            "irritable bowel syndrome",
            "Crohn disease",
            "ulcerative colitis",
            "fatty liver disease",
            "peptic ulcer disease",
        ),
        medications=(
            "omeprazole 20 mg daily",
            "mesalamine 1.2 g twice daily",
            "pantoprazole 40 mg daily",
            "loperamide 2 mg as needed",
            "polyethylene glycol 17 g daily",
            "ondansetron 4 mg as needed",
        ),
        tests=(
            "colonoscopy",
            "upper endoscopy",
            "liver function tests",
            "stool studies",
            "abdominal ultrasound",
            "celiac serology",
        ),
        findings=(
            "epigastric tenderness",
            "a soft nontender abdomen",
            "normal bowel sounds",
            "mild right lower quadrant tenderness",
            "no organomegaly",
            "heme positive stool",
        ),
        procedures=("colonoscopy with biopsy", "upper endoscopy", "hepatology referral", "dietary counseling"),
    ),
}

SPECIALTIES: tuple[str, ...] = tuple(VOCABULARY)

# Longest phrases first, so "pulmonary function tests" is not cut up by a shorter rule.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("chronic obstructive pulmonary disease", "COPD"),
    ("gastroesophageal reflux disease", "GERD"),
    ("viral upper respiratory infection", "viral URI"),
    ("transient ischemic attack", "TIA"),
    ("coronary artery disease", "CAD"),
    ("irritable bowel syndrome", "IBS"),
    ("obstructive sleep apnea", "OSA"),
    ("pulmonary function tests", "PFTs"),
    ("atrial fibrillation", "AFib"),
    ("shortness of breath", "SOB"),
    ("multiple sclerosis", "MS"),
    ("three times daily", "TID"),
    ("four times daily", "QID"),
    ("range of motion", "ROM"),
    ("type 2 diabetes", "T2DM"),
    ("hyperlipidemia", "HLD"),
    ("heart failure", "HF"),
    ("hypertension", "HTN"),
    ("twice daily", "BID"),
    ("at bedtime", "QHS"),
    ("as needed", "PRN"),
    ("history of", "hx of"),
    ("Follow up", "F/u"),
    ("emergency department", "ED"),
)
