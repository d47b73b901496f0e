(define (problem plan_trial_T20260101_000002_000001)
    (:domain alfred)
    (:objects
        agent1 - agent
        AppleType - otype
        BowlType - otype
        KnifeType - otype
        PotatoType - otype
        CabinetType - rtype
        CounterTopType - rtype
        DiningTableType - rtype
        FridgeType - rtype
        MicrowaveType - rtype
        SinkBasinType - rtype
        StoveBurnerType - rtype
        Cabinet_bar__minus_00_dot_90_bar__plus_02_dot_00_bar__minus_02_dot_40 - receptacle
        CounterTop_bar__plus_00_dot_70_bar__plus_00_dot_95_bar__minus_02_dot_50 - receptacle
        DiningTable_bar__minus_02_dot_10_bar__plus_00_dot_75_bar__plus_01_dot_40 - receptacle
        Fridge_bar__minus_02_dot_10_bar_00_dot_00_bar__minus_01_dot_00 - receptacle
        Microwave_bar__plus_01_dot_30_bar__plus_01_dot_60_bar__minus_02_dot_50 - receptacle
        Sink_bar__plus_02_dot_20_bar__plus_00_dot_90_bar__plus_00_dot_40_bar_SinkBasin - receptacle
        StoveBurner_bar__minus_00_dot_30_bar__plus_00_dot_92_bar__minus_02_dot_40 - receptacle
        Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05 - object
        Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35 - object
        Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45 - object
        Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38 - object
        loc_bar_0_bar_0_bar_2_bar_30 - location
        loc_bar__minus_3_bar__minus_7_bar_2_bar__minus_30 - location
        loc_bar_3_bar__minus_7_bar_2_bar_45 - location
        loc_bar__minus_6_bar_5_bar_3_bar_45 - location
        loc_bar__minus_5_bar__minus_3_bar_3_bar_60 - location
        loc_bar_5_bar__minus_7_bar_2_bar_0 - location
        loc_bar_8_bar_1_bar_1_bar_60 - location
        loc_bar__minus_1_bar__minus_7_bar_2_bar_45 - location
        )
    (:init
        (= (total-cost) 0)
        (atLocation agent1 loc_bar_0_bar_0_bar_2_bar_30)
        (receptacleType Cabinet_bar__minus_00_dot_90_bar__plus_02_dot_00_bar__minus_02_dot_40 CabinetType)
        (receptacleAtLocation Cabinet_bar__minus_00_dot_90_bar__plus_02_dot_00_bar__minus_02_dot_40 loc_bar__minus_3_bar__minus_7_bar_2_bar__minus_30)
        (openable Cabinet_bar__minus_00_dot_90_bar__plus_02_dot_00_bar__minus_02_dot_40)
        (receptacleType CounterTop_bar__plus_00_dot_70_bar__plus_00_dot_95_bar__minus_02_dot_50 CounterTopType)
        (receptacleAtLocation CounterTop_bar__plus_00_dot_70_bar__plus_00_dot_95_bar__minus_02_dot_50 loc_bar_3_bar__minus_7_bar_2_bar_45)
        (receptacleType DiningTable_bar__minus_02_dot_10_bar__plus_00_dot_75_bar__plus_01_dot_40 DiningTableType)
        (receptacleAtLocation DiningTable_bar__minus_02_dot_10_bar__plus_00_dot_75_bar__plus_01_dot_40 loc_bar__minus_6_bar_5_bar_3_bar_45)
        (receptacleType Fridge_bar__minus_02_dot_10_bar_00_dot_00_bar__minus_01_dot_00 FridgeType)
        (receptacleAtLocation Fridge_bar__minus_02_dot_10_bar_00_dot_00_bar__minus_01_dot_00 loc_bar__minus_5_bar__minus_3_bar_3_bar_60)
        (openable Fridge_bar__minus_02_dot_10_bar_00_dot_00_bar__minus_01_dot_00)
        (receptacleType Microwave_bar__plus_01_dot_30_bar__plus_01_dot_60_bar__minus_02_dot_50 MicrowaveType)
        (receptacleAtLocation Microwave_bar__plus_01_dot_30_bar__plus_01_dot_60_bar__minus_02_dot_50 loc_bar_5_bar__minus_7_bar_2_bar_0)
        (openable Microwave_bar__plus_01_dot_30_bar__plus_01_dot_60_bar__minus_02_dot_50)
        (receptacleType Sink_bar__plus_02_dot_20_bar__plus_00_dot_90_bar__plus_00_dot_40_bar_SinkBasin SinkBasinType)
        (receptacleAtLocation Sink_bar__plus_02_dot_20_bar__plus_00_dot_90_bar__plus_00_dot_40_bar_SinkBasin loc_bar_8_bar_1_bar_1_bar_60)
        (receptacleType StoveBurner_bar__minus_00_dot_30_bar__plus_00_dot_92_bar__minus_02_dot_40 StoveBurnerType)
        (receptacleAtLocation StoveBurner_bar__minus_00_dot_30_bar__plus_00_dot_92_bar__minus_02_dot_40 loc_bar__minus_1_bar__minus_7_bar_2_bar_45)
        (objectType Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05 PotatoType)
        (inReceptacle Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05 Fridge_bar__minus_02_dot_10_bar_00_dot_00_bar__minus_01_dot_00)
        (objectAtLocation Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05 loc_bar__minus_5_bar__minus_3_bar_3_bar_60)
        (pickupable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (moveable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (heatable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (coolable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (cleanable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (sliceable Potato_bar__minus_02_dot_05_bar__plus_00_dot_80_bar__minus_01_dot_05)
        (objectType Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35 AppleType)
        (inReceptacle Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35 DiningTable_bar__minus_02_dot_10_bar__plus_00_dot_75_bar__plus_01_dot_40)
        (objectAtLocation Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35 loc_bar__minus_6_bar_5_bar_3_bar_45)
        (pickupable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (moveable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (heatable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (coolable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (cleanable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (sliceable Apple_bar__minus_02_dot_00_bar__plus_00_dot_80_bar__plus_01_dot_35)
        (objectType Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45 KnifeType)
        (inReceptacle Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45 CounterTop_bar__plus_00_dot_70_bar__plus_00_dot_95_bar__minus_02_dot_50)
        (objectAtLocation Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45 loc_bar_3_bar__minus_7_bar_2_bar_45)
        (pickupable Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45)
        (moveable Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45)
        (cleanable Knife_bar__plus_00_dot_60_bar__plus_00_dot_97_bar__minus_02_dot_45)
        (objectType Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38 BowlType)
        (inReceptacle Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38 Cabinet_bar__minus_00_dot_90_bar__plus_02_dot_00_bar__minus_02_dot_40)
        (objectAtLocation Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38 loc_bar__minus_3_bar__minus_7_bar_2_bar__minus_30)
        (pickupable Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (moveable Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (heatable Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (coolable Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (cleanable Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (isReceptacleObject Bowl_bar__minus_00_dot_92_bar__plus_02_dot_02_bar__minus_02_dot_38)
        (canContain CounterTopType PotatoType)
        (canContain CounterTopType AppleType)
        (canContain CounterTopType KnifeType)
        (canContain CounterTopType BowlType)
        (canContain FridgeType PotatoType)
        (canContain FridgeType AppleType)
        (canContain FridgeType BowlType)
        (canContain MicrowaveType PotatoType)
        (canContain MicrowaveType AppleType)
        (canContain MicrowaveType BowlType)
        (canContain SinkBasinType PotatoType)
        (canContain SinkBasinType AppleType)
        (canContain SinkBasinType KnifeType)
        (canContain SinkBasinType BowlType)
        (canContain CabinetType BowlType)
        (canContain CabinetType KnifeType)
        (canContain DiningTableType PotatoType)
        (canContain DiningTableType AppleType)
        (canContain DiningTableType KnifeType)
        (canContain DiningTableType BowlType)
        (canContain StoveBurnerType BowlType)
        )

    (:goal
        (and
            (exists (?o - object ?r - receptacle)
                (and
                    (objectType ?o PotatoType)
                    (receptacleType ?r CounterTopType)
                    (heatable ?o)
                    (isHot ?o)
                    (inReceptacle ?o ?r)
                )
            )
        )
    )
)
